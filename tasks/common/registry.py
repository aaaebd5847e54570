"""Model Registry helpers: who holds an alias, and moving `production` forward or back.

Every move of `production` is one alias update (atomic on the registry server) followed by
appending to the registered model's `production_history` tag, which rollback reads.
"""

from __future__ import annotations

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.common.errors import ConfigError, PipelineError

PRODUCTION = "production"
CHALLENGER = "challenger"
HISTORY_TAG = "production_history"


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version holding alias, or None when the model or the alias does not exist."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def production_version(client: MlflowClient, name: str, task: str) -> ModelVersion | None:
    """The version holding `production`, or None; one of another task kind is an error."""
    version = version_by_alias(client, name, PRODUCTION)
    if version is None:
        return None
    held = version.tags.get("task", "sequence_classification")
    if held != task:
        raise ConfigError(
            f"registry.model_name {name!r}: its production version v{version.version} is a "
            f"{held} model, not {task}; give this pipeline its own registry.model_name"
        )
    return version


def ensure_registered_model(client: MlflowClient, name: str, description: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name, description=description)


def production_history(client: MlflowClient, name: str) -> list[str]:
    tag = client.get_registered_model(name).tags.get(HISTORY_TAG, "")
    return [v for v in tag.split(",") if v]


def failed_gates(version: ModelVersion) -> list[str]:
    return sorted(
        k for k, v in version.tags.items() if k.startswith("gate.") and not v.startswith("passed")
    )


def move_production(client: MlflowClient, name: str, version: str, reason: str) -> str | None:
    """Point `production` at version; record the previous holder. Returns it (or None)."""
    previous = version_by_alias(client, name, PRODUCTION)
    previous_version = str(previous.version) if previous else None
    if previous_version == str(version):
        return previous_version  # already there: nothing to move or record
    if previous_version is not None:
        client.set_model_version_tag(name, version, "previous_production", previous_version)
    client.set_registered_model_alias(name, PRODUCTION, version)
    history = production_history(client, name)
    if not history and previous_version is not None:
        history = [previous_version]
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join([*history, str(version)]))
    client.set_model_version_tag(name, version, "promotion", reason[:5000])
    return previous_version


def promote(client: MlflowClient, name: str, version: str, force: bool = False) -> str | None:
    """Manual promotion of a registered version; refuses one with a failed gate unless forced."""
    try:
        mv = client.get_model_version(name, version)
    except MlflowException as exc:
        raise PipelineError(
            f"model {name!r} has no version {version!r}: list them with "
            f"`mlflow models` in the UI or MlflowClient().search_model_versions"
        ) from exc
    failed = failed_gates(mv)
    if failed and not force:
        raise PipelineError(
            f"{name} v{version} failed gates {', '.join(failed)}; refusing to promote "
            f"it (pass --force to override)"
        )
    return move_production(
        client, name, str(version), "manual promotion" + (" (forced)" if force else "")
    )


def rollback(client: MlflowClient, name: str) -> tuple[str, str]:
    """Move `production` back to the version that held it before. Returns (from, to)."""
    current = version_by_alias(client, name, PRODUCTION)
    if current is None:
        raise PipelineError(f"model {name!r} has no production version to roll back")
    history = production_history(client, name)
    if len(history) < 2 or history[-1] != str(current.version):
        raise PipelineError(
            f"{name}: no earlier production version recorded before "
            f"v{current.version}; promote a version explicitly instead"
        )
    target = history[-2]
    client.set_registered_model_alias(name, PRODUCTION, target)
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history[:-1]))
    client.set_model_version_tag(name, target, "promotion", f"rollback from v{current.version}")
    client.set_model_version_tag(name, str(current.version), "rolled_back", "true")
    return str(current.version), target
