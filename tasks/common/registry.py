"""Model Registry helpers: who holds an alias, gate records, and moving `production`.

A registered version is promotable only with a complete gate record: the register stage
writes every gate as a `gate.<name>` tag and then, last, all of them as JSON in the
`gates.record` tag. A version without that record was interrupted while it was registered.

Moving `production` is one alias update (atomic on the registry server) and an update of
the registered model's `production_history` tag, which rollback reads. The two cannot be one
transaction, so their order makes a crash between them harmless: a move sets the alias first
and the history second, a rollback shortens the history first and sets the alias second, and
reading the history appends the current holder when a crash left it out.
"""

from __future__ import annotations

import json

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from tasks.common.errors import ConfigError, PipelineError
from tasks.common.faults import kill_point
from tasks.common.gates import Gate

PRODUCTION = "production"
CHALLENGER = "challenger"
HISTORY_TAG = "production_history"
GATES_TAG = "gates.record"
DEFAULT_TASK = "sequence_classification"  # versions registered before the task tag existed
MISSING = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version holding alias, or None when the model or the alias does not exist."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in MISSING:
            return None
        raise


def get_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code not in MISSING:
            raise
        raise PipelineError(
            f"model {name!r} has no version {version!r}: list them in the MLflow UI (Models) or "
            f"with MlflowClient().search_model_versions(\"name='{name}'\")"
        ) from None


def production_version(client: MlflowClient, name: str, task: str) -> ModelVersion | None:
    """The version holding `production`, or None; one of another task kind is an error."""
    version = version_by_alias(client, name, PRODUCTION)
    if version is None:
        return None
    held = version.tags.get("task", DEFAULT_TASK)
    if held != task:
        raise ConfigError(
            f"registry.model_name {name!r}: its production version v{version.version} is a "
            f"{held} model, not {task}; give this pipeline its own registry.model_name"
        )
    return version


def ensure_registered_model(client: MlflowClient, name: str, description: str) -> None:
    """Create the registered model on first use (a concurrent creation is fine)."""
    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(name, description=description)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def create_version(client: MlflowClient, name: str, model_uri: str, tags: dict) -> str:
    """A new version of the registered model `name` (ensure_registered_model made it) from a
    logged model (models:/<model id>), linked both ways as mlflow.register_model links them.
    Not register_model itself: it would try to create the registered model again and print
    "Registered model ... already exists" (and "Created version ...") on stderr."""
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/") else None
    source, run_id = model_uri, None
    if model_id is not None:  # the logged model's folder: a models:/ source would be looked up
        logged = client.get_logged_model(model_id)  # through MLflow's global tracking URI
        source, run_id = logged.artifact_location, logged.source_run_id
    version = client.create_model_version(
        name, source=source, run_id=run_id, tags=tags, await_creation_for=300, model_id=model_id
    )
    if model_id is not None:  # the logged model's list of its versions (MLflow UI)
        listed = client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
        entry = {"name": version.name, "version": version.version}
        links = [*(json.loads(listed) if listed else []), entry]
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(links)})
    return str(version.version)


def gate_record(version: ModelVersion) -> list[Gate] | None:
    """The version's complete gate record, or None when registration never finished it."""
    text = version.tags.get(GATES_TAG)
    return None if text is None else [Gate(**g) for g in json.loads(text)]


def has_complete_record(version: ModelVersion) -> bool:
    """A gate record, or (versions registered before it existed) the decision written last."""
    return GATES_TAG in version.tags or "decision" in version.tags


def write_gate_record(client: MlflowClient, name: str, version: str, gates: list[Gate]) -> None:
    """One tag per gate (readable in the UI), then the whole record (the completeness mark)."""
    for g in gates:
        verdict = "passed" if g.passed else "failed"
        text = f"{verdict} ({g.value:.6g} {g.comparison} {g.threshold:.6g})"
        client.set_model_version_tag(name, version, f"gate.{g.name}", text)
    record = json.dumps([g.as_dict() for g in gates], separators=(",", ":"))
    client.set_model_version_tag(name, version, GATES_TAG, record)


def delete_unfinished(client: MlflowClient, name: str, version: str) -> None:
    """Delete a version whose registration did not finish; never one an alias points at."""
    held = get_version(client, name, version)
    if held.aliases:
        raise PipelineError(
            f"{name} v{version} holds {', '.join(sorted(held.aliases))} but its registration "
            f"did not finish; it is not deleted: check it in the MLflow UI and promote or "
            f"roll back by hand"
        )
    client.delete_model_version(name, version)


def production_history(client: MlflowClient, name: str) -> list[str]:
    """Every production holder in order, ending with the current one."""
    tag = client.get_registered_model(name).tags.get(HISTORY_TAG, "")
    history = [v for v in tag.split(",") if v]
    current = version_by_alias(client, name, PRODUCTION)
    if current is not None and (not history or history[-1] != str(current.version)):
        history.append(str(current.version))  # a crash between alias and history
    return history


def move_production(client: MlflowClient, name: str, version: str, reason: str) -> str | None:
    """Point `production` at version; record the previous holder. Returns it (or None)."""
    history = production_history(client, name)
    previous_version = history[-1] if history else None
    if previous_version == str(version):
        client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history))
        return previous_version  # already there (a resumed move): nothing else to do
    if previous_version is not None:
        client.set_model_version_tag(name, version, "previous_production", previous_version)
    client.set_registered_model_alias(name, PRODUCTION, version)
    kill_point("registry:after-alias")
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join([*history, str(version)]))
    client.set_model_version_tag(name, version, "promotion", reason[:5000])
    return previous_version


def failed_gates(version: ModelVersion) -> list[str]:
    return sorted(
        k for k, v in version.tags.items() if k.startswith("gate.") and not v.startswith("passed")
    )


def promote(client: MlflowClient, name: str, version: str, force: bool = False) -> str | None:
    """Manual promotion of a registered version with a complete record; refuses failed gates
    unless forced, and an incomplete record always."""
    held = get_version(client, name, version)
    if not has_complete_record(held):
        raise PipelineError(
            f"{name} v{version} has no complete gate record (its pipeline run was interrupted "
            f"while registering it); refusing to promote it: re-run that pipeline to finish it"
        )
    current = version_by_alias(client, name, PRODUCTION)
    task, serving = (v.tags.get("task", DEFAULT_TASK) for v in (held, current or held))
    if task != serving:
        raise PipelineError(
            f"{name} v{version} is a {task} model but production (v{current.version}) serves "
            f"{serving}: clients would get other answers; register it under its own model name"
        )
    failed = failed_gates(held)
    if failed and not force:
        raise PipelineError(
            f"{name} v{version} failed gates {', '.join(failed)}; refusing to promote it (pass "
            f"--force to override)"
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
    if len(history) < 2:
        raise PipelineError(
            f"{name}: no earlier production version recorded before "
            f"v{current.version}; promote a version explicitly instead"
        )
    target = history[-2]
    get_version(client, name, target)  # a deleted earlier holder is a clear error
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history[:-1]))
    kill_point("registry:after-history")
    client.set_registered_model_alias(name, PRODUCTION, target)
    client.set_model_version_tag(name, target, "promotion", f"rollback from v{current.version}")
    client.set_model_version_tag(name, str(current.version), "rolled_back", "true")
    return str(current.version), target
