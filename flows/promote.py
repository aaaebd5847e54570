"""The promote/rollback flow: move `production` to a registered version, or back."""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.common.config import load_config
from tasks.common.credentials import load_credentials
from tasks.common.errors import PipelineError
from tasks.common.registry import promote, rollback
from tasks.common.tracking import Tracking


def move_production_alias(
    model_name: str, action: str, version: str | None, config_path: str, force: bool = False
) -> dict:
    """Promote `version` (refusing failed gates unless forced) or roll back to the previous one."""
    tracking = load_config(config_path).tracking
    load_credentials(tracking)
    client = Tracking.connect(tracking).client
    if action == "rollback":
        moved_from, moved_to = rollback(client, model_name)
    elif action == "promote":
        if version is None:
            raise PipelineError("promote needs a version: pass --version N (version=N)")
        moved_from, moved_to = promote(client, model_name, str(version), force=force), str(version)
    else:
        raise PipelineError(f"unknown action {action!r}: use promote or rollback")
    return {"model_name": model_name, "action": action, "from": moved_from, "to": moved_to}


@flow(name="lora-promote", log_prints=True)
def promote_flow(
    model_name: str,
    action: Literal["promote", "rollback"] = "promote",
    version: str | None = None,
    config_path: str = "configs/default.yaml",
    force: bool = False,
) -> dict:
    """Move the production alias on request and show the move as a Prefect artifact."""
    result = move_production_alias(model_name, action, version, config_path, force)
    summary = f"{model_name}: production v{result['from']} -> v{result['to']} ({action})"
    get_run_logger().info(summary)
    create_markdown_artifact(markdown=f"# {summary}\n", key="production-move", description=summary)
    return result
