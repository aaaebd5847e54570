"""The registry stays consistent whatever was interrupted: gate records, aliases, history."""

from __future__ import annotations

import pytest

from tasks.common.errors import PipelineError
from tasks.common.gates import evaluate_gate
from tasks.common.registry import (
    HISTORY_TAG,
    PRODUCTION,
    delete_unfinished,
    move_production,
    production_history,
    promote,
    rollback,
    version_by_alias,
    write_gate_record,
)


@pytest.fixture
def registry(run):
    """A fresh registered model per test, its versions built from the tiny run's model."""
    import uuid

    client = run.client
    name = f"safety-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    source = client.get_model_version("tiny-classifier", "1").source

    def add(complete=True, passed=True) -> str:
        with run.tracking.fluent():  # MLflow resolves a models:/ source through it
            version = str(client.create_model_version(name, source, run_id=run.run_id).version)
        if complete:
            gates = [evaluate_gate("onnx_parity_max_abs_diff", 1e-6 if passed else 1.0, 1e-4, "<=")]
            write_gate_record(client, name, version, gates)
        return version

    return client, name, add


def aliases(client, name):
    return {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}


def test_a_version_without_a_complete_gate_record_is_never_promoted(registry):
    client, name, add = registry
    version = add(complete=False)
    for force in (False, True):
        with pytest.raises(PipelineError) as err:
            promote(client, name, version, force=force)
        assert str(err.value) == (
            f"{name} v{version} has no complete gate record (its pipeline run was interrupted "
            f"while registering it); refusing to promote it: re-run that pipeline to finish it"
        )
    assert aliases(client, name) == {}


def test_a_failed_gate_needs_force(registry):
    client, name, add = registry
    version = add(passed=False)
    with pytest.raises(PipelineError, match=r"failed gates gate.onnx_parity_max_abs_diff;"):
        promote(client, name, version)
    assert promote(client, name, version, force=True) is None
    assert aliases(client, name) == {"production": version}


def test_clean_up_never_deletes_a_version_an_alias_points_at(registry):
    client, name, add = registry
    version = add(complete=False)
    client.set_registered_model_alias(name, PRODUCTION, version)
    with pytest.raises(PipelineError, match=rf"^{name} v{version} holds production but its "):
        delete_unfinished(client, name, version)
    assert client.get_model_version(name, version).version == int(version)
    other = add(complete=False)
    delete_unfinished(client, name, other)
    assert [v.version for v in client.search_model_versions(f"name='{name}'")] == [int(version)]


def test_history_survives_a_crash_between_the_alias_and_the_history(registry):
    client, name, add = registry
    first, second = add(), add()
    move_production(client, name, first, "first")
    client.set_registered_model_alias(name, PRODUCTION, second)  # the move's first half only
    assert client.get_registered_model(name).tags[HISTORY_TAG] == first
    assert production_history(client, name) == [first, second]
    assert move_production(client, name, second, "resumed") == second  # finishing is a no-op
    assert client.get_registered_model(name).tags[HISTORY_TAG] == f"{first},{second}"
    assert rollback(client, name) == (second, first)
    assert aliases(client, name) == {"production": first}


def test_a_rollback_interrupted_after_the_history_can_be_repeated(registry):
    client, name, add = registry
    first, second = add(), add()
    move_production(client, name, first, "first")
    move_production(client, name, second, "second")
    client.set_registered_model_tag(name, HISTORY_TAG, first)  # rollback's first half only
    assert production_history(client, name) == [first, second]  # nothing was lost
    assert rollback(client, name) == (second, first)
    assert production_history(client, name) == [first]


def test_rollback_to_a_deleted_version_is_a_clear_error(registry):
    client, name, add = registry
    first, second = add(), add()
    move_production(client, name, first, "first")
    move_production(client, name, second, "second")
    client.delete_registered_model_alias(name, PRODUCTION)
    client.set_registered_model_alias(name, PRODUCTION, second)
    client.delete_model_version(name, first)
    with pytest.raises(PipelineError, match=rf"^model {name!r} has no version '{first}'"):
        rollback(client, name)
    assert version_by_alias(client, name, PRODUCTION).version == int(second)


def test_a_production_model_of_the_other_task_is_a_clear_error(registry):
    from tasks.common.errors import ConfigError
    from tasks.common.registry import production_version

    client, name, add = registry
    version = add()
    client.set_model_version_tag(name, version, "task", "causal_lm")
    client.set_registered_model_alias(name, PRODUCTION, version)
    with pytest.raises(ConfigError) as err:
        production_version(client, name, "sequence_classification")
    assert str(err.value) == (
        f"registry.model_name {name!r}: its production version v{version} is a causal_lm "
        "model, not sequence_classification; give this pipeline its own registry.model_name"
    )
    assert production_version(client, name, "causal_lm").version == int(version)


def test_the_registered_model_says_what_it_is_for(run):
    from tasks.classification import kind

    description = run.client.get_registered_model("tiny-classifier").description
    assert description == kind.DESCRIPTION and "text classifier" in description


def test_a_version_of_another_task_never_replaces_production(registry):
    client, name, add = registry
    serving, other = add(), add()
    promote(client, name, serving)
    client.set_model_version_tag(name, other, "task", "causal_lm")
    for force in (False, True):
        with pytest.raises(PipelineError) as err:
            promote(client, name, other, force=force)
        assert str(err.value) == (
            f"{name} v{other} is a causal_lm model but production (v{serving}) serves "
            f"sequence_classification: clients would get other answers; register it under its "
            f"own model name"
        )
    assert aliases(client, name) == {"production": serving}
