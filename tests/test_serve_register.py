"""serve_check, the served-model check, registration, champion comparison, promote/rollback."""

from __future__ import annotations

import json

import mlflow
import pandas as pd
import pytest

import tasks.register.served_check as served_check_module
from tasks.common.champion import paired_bootstrap
from tasks.common.errors import GateFailed, PipelineError
from tasks.common.registry import production_history, promote, rollback
from tasks.stages import register


def aliases(run, name: str = "tiny-classifier") -> dict[str, str]:
    return {k: str(v) for k, v in run.client.get_registered_model(name).aliases.items()}


def renamed(run, name: str, **serve):
    """The run's config, registering under another model name (tests stay independent)."""
    config = run.config
    update = {"registry": config.registry.model_copy(update={"model_name": name})}
    if serve:
        update["serve"] = config.serve.model_copy(update=serve)
    return config.model_copy(update=update)


def submit(run, config, evaluation, served, gates):
    """Register the tiny run's model as a new candidate (its own MLflow run, as in production).

    Its evaluation names the production version it met, as a real run's does (register only
    moves production away from the version the candidate was compared with)."""
    from dataclasses import replace

    from tasks.common.registry import PRODUCTION, version_by_alias
    from tasks.common.tracking import start_pipeline_run

    current = version_by_alias(run.client, config.registry.model_name, PRODUCTION)
    if evaluation.production_version is None and current is not None:
        evaluation = replace(evaluation, production_version=str(current.version))
    return register(
        config, run.data, evaluation, run.quantized, served, gates, start_pipeline_run(config)
    )


def test_serve_check_uses_cpu_provider_and_times_every_engine(run):
    """onnx and PyTorch fp32; on a CPU with bf16 matrix kernels also PyTorch bf16, the
    strongest peer there, with the served model's speedups against it."""
    from tasks.common.hardware import bf16_kernels

    s = run.served
    assert s.provider == "CPUExecutionProvider"
    assert s.metrics["accuracy"] == pytest.approx(run.quantized.served_score)
    assert len(s.answers) == 40
    bf16 = bf16_kernels() is not None
    engines = ("onnx", "torch", "torch_bf16") if bf16 else ("onnx", "torch")
    assert ("serve/torch_bf16.batch1_p50_ms" in s.timings) is bf16
    assert ("serve/speedup_vs_bf16.batch8_throughput" in s.timings) is bf16
    assert s.timings["serve/speedup.batch1_p50"] == pytest.approx(
        s.timings["serve/torch.batch1_p50_ms"] / s.timings["serve/onnx.batch1_p50_ms"]
    )
    for engine in engines:
        t = {
            k.removeprefix(f"serve/{engine}."): v
            for k, v in s.timings.items()
            if k.startswith(f"serve/{engine}.")
        }
        assert 0 < t["batch1_p50_ms"] <= t["batch1_p95_ms"] <= t["batch1_p99_ms"]
        assert t["batch1_p50_ms_with_tokenizer"] > 0  # (no cross-run timing comparison:
        # two measurements on a shared machine cannot be ordered reliably)
        assert t["batch8_per_second"] > 0 and t["batch8_per_second_with_tokenizer"] > 0
    tags = run.client.get_run(run.run_id).data.tags
    assert tags["serve.provider"] == "CPUExecutionProvider"
    assert "plots/serving_latency.png" in {
        a.path for a in run.client.list_artifacts(run.run_id, "plots")
    }


def test_asking_for_cuda_without_it_is_an_error(run):
    from tasks.common.onnx import SERVED_FILE, open_session

    with pytest.raises(
        PipelineError,
        match=r"^serve.device is cuda but onnxruntime runs model_served.onnx on "
        r"\['CPUExecutionProvider'\]",
    ):
        open_session(run.fetch(run.quantized.model) / SERVED_FILE, device="cuda")


def test_registering_the_same_run_again_adds_no_version(run):
    again = register(
        run.config, run.data, run.evaluation, run.quantized, run.served, run.gates, run.run_id
    )
    assert again.version == "1" and again.promoted
    versions = run.client.search_model_versions("name='tiny-classifier'")
    assert [str(v.version) for v in versions] == ["1"]


def test_register_sets_aliases_and_gate_tags(run):
    r = run.registration
    assert r.version == "1" and r.promoted
    assert aliases(run) == {"challenger": "1", "production": "1"}
    tags = run.client.get_model_version("tiny-classifier", "1").tags
    assert tags["gate.merge_parity_max_abs_diff"].startswith("passed")
    assert tags["run_id"] == run.run_id and tags["onnx.variant"] == run.quantized.variant
    if run.quantized.variant != "fp32":  # the head stays fp32 in every int8 variant
        assert "classifier" in tags["quantize.fp32_nodes"]
    else:
        assert tags["quantize.fp32_nodes"] == "every node"
    chosen = next((c for c in run.quantized.candidates if c.name == run.quantized.variant), None)
    smoothed = chosen.smoothed if chosen else {}  # SmoothQuant's nodes, if the search chose it
    assert all(node in tags["quantize.smoothed_nodes"] for node in smoothed)
    assert smoothed or tags["quantize.smoothed_nodes"] == "none"
    report = json.loads(run.text("promotion/report.json"))
    assert report["promoted"] is True and len(report["gates"]) == 5
    assert "Production moved:** yes" in run.text("promotion/report.md")


def test_registered_model_answers_with_labels_and_probabilities(run):
    with run.tracking.fluent():
        served = mlflow.pyfunc.load_model("models:/tiny-classifier/1")
    texts = ["I was charged twice for one order", "my package is late"]
    out = served.predict(pd.DataFrame({"text": texts}))
    assert list(out.columns) == ["label", "score", "probabilities"]
    assert set(out["label"]) <= set(run.label_names)
    for probs in out["probabilities"]:
        assert sum(probs.values()) == pytest.approx(1.0)


def test_served_model_check_passes_through_mlflow_models_serve(run):
    config = renamed(run, "served-ok", served_model_check=True)
    result = submit(run, config, run.evaluation, run.served, run.gates)
    gate = next(g for g in result.gates if g.name == "served_model_prediction_mismatches")
    assert gate.passed and gate.value == 0 and result.promoted
    run_id = run.client.get_model_version("served-ok", result.version).run_id
    metrics = run.client.get_run(run_id).data.metrics
    assert metrics["serve/http.request_p50_ms"] > 0 and metrics["serve/http.golden_requests"] == 16


def test_served_model_that_answers_differently_is_rejected(run, monkeypatch):
    config = renamed(run, "served-bad", served_model_check=True)
    submit(
        run, renamed(run, "served-bad"), run.evaluation, run.served, run.gates
    )  # v1 in production
    real_invoke = served_check_module.invoke_records

    def wrong(url, records, timeout_s=60):
        answers = real_invoke(url, records, timeout_s)
        return [{**a, "label": "not-a-label"} for a in answers]

    monkeypatch.setattr(served_check_module, "invoke_records", wrong)
    with pytest.raises(
        GateFailed, match=r"^gate served_model_prediction_mismatches FAILED: measured 16"
    ):
        submit(run, config, run.evaluation, run.served, run.gates)
    versions = run.client.search_model_versions("name='served-bad'")
    assert [str(v.version) for v in versions] == ["1"]  # the rejected version was deleted
    assert aliases(run, "served-bad") == {"challenger": "1", "production": "1"}


def test_production_does_not_move_when_a_gate_failed(run):
    config = renamed(run, "gate-failed")
    submit(run, config, run.evaluation, run.served, run.gates)
    failed = [
        *run.gates[:-1],
        type(run.gates[-1])("quantized_accuracy_drop", 0.3, 0.02, "<=", False),
    ]
    result = submit(run, config, run.evaluation, run.served, failed)
    assert not result.promoted and result.reason == "gates failed: quantized_accuracy_drop"
    assert aliases(run, "gate-failed") == {"challenger": "2", "production": "1"}
    tags = run.client.get_model_version("gate-failed", "2").tags
    assert tags["gate.quantized_accuracy_drop"].startswith("failed")


def _evaluation_with_production(run, production_answers):
    return run.evaluation.__class__(
        metrics=run.evaluation.metrics,
        production_metrics={"accuracy": 0.0, "macro_f1": 0.0},
        production_version="1",
        production_answers=production_answers,
    )


def test_champion_gate_uses_the_bootstrap_interval(run):
    config = renamed(run, "champion")
    submit(run, config, run.evaluation, run.served, run.gates)
    perfect = _evaluation_with_production(run, list(run.served.references))  # flawless
    worse = submit(run, config, perfect, run.served, run.gates)
    assert not worse.promoted
    assert worse.reason.startswith(
        "candidate trails production: gate champion_macro_f1_delta_ci_low FAILED"
    )
    assert worse.comparison.high <= 0 and worse.comparison.low < -0.03
    assert aliases(run, "champion") == {"challenger": "2", "production": "1"}

    same = _evaluation_with_production(run, list(run.served.answers))  # identical answers
    equal = submit(run, config, same, run.served, run.gates)
    assert equal.promoted and equal.previous_production == "1"
    assert equal.comparison.low == equal.comparison.high == 0
    assert aliases(run, "champion") == {"challenger": "3", "production": "3"}


def test_paired_bootstrap_interval_brackets_the_difference():
    y = [0, 1, 2, 3] * 25
    candidate = list(y)
    production = [(v + 1) % 4 if i % 5 == 0 else v for i, v in enumerate(y)]  # 80% right
    c = paired_bootstrap("accuracy", y, candidate, production, 4, samples=500)
    assert c.delta == pytest.approx(0.2)
    assert 0.1 < c.low < 0.2 < c.high < 0.3
    unknown = paired_bootstrap("macro_f1", y, candidate, [-1] * 100, 4, samples=100)
    assert unknown.delta == pytest.approx(1.0)


def test_promote_refuses_failed_gates_and_rollback_moves_back(run):
    config = renamed(run, "rollback")
    submit(run, config, run.evaluation, run.served, run.gates)
    failed = [
        *run.gates[:-1],
        type(run.gates[-1])("quantized_accuracy_drop", 0.3, 0.02, "<=", False),
    ]
    submit(run, config, run.evaluation, run.served, failed)
    submit(run, config, run.evaluation, run.served, run.gates)
    client = run.client
    assert aliases(run, "rollback")["production"] == "3" and production_history(
        client, "rollback"
    ) == [
        "1",
        "3",
    ]

    with pytest.raises(PipelineError) as err:
        promote(client, "rollback", "2")
    assert str(err.value) == (
        "rollback v2 failed gates gate.quantized_accuracy_drop; refusing to "
        "promote it (pass --force to override)"
    )
    assert rollback(client, "rollback") == ("3", "1")
    assert aliases(run, "rollback")["production"] == "1"
    assert client.get_model_version("rollback", "3").tags["rolled_back"] == "true"
    with pytest.raises(PipelineError, match=r"no earlier production version recorded before v1"):
        rollback(client, "rollback")
    assert promote(client, "rollback", "3") == "1"
    assert aliases(run, "rollback")["production"] == "3"


def test_cli_promote_and_rollback_run_the_promote_flow(run, tmp_path, cli, prefect_api):
    """CLI processes forked from one that imported the CLI once (testkit/cli.py)."""
    import os

    import yaml

    config = renamed(run, "cli-moves")
    submit(run, config, run.evaluation, run.served, run.gates)
    submit(run, config, run.evaluation, run.served, run.gates)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {**os.environ, "PREFECT_API_URL": prefect_api}

    def move(*args):
        argv = [*args, "--model", "cli-moves", "--config", str(path)]
        return cli.run(argv, env=env, timeout=300)

    back = move("rollback")
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout[back.stdout.index("{") :])["to"] == "1"
    assert aliases(run, "cli-moves")["production"] == "1"
    again = move("promote", "--version", "2")
    assert again.returncode == 0, again.stderr
    assert aliases(run, "cli-moves")["production"] == "2"
    missing = move("promote", "--version", "9")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "error: model 'cli-moves' has no version '9'" in missing.stderr


def test_a_production_model_with_other_labels_is_not_compared_and_keeps_production(run, tmp_path):
    """Labels "1","2" against a production of "1.0","2.0" once scored production 0.0 and
    promoted on that; now the comparison refuses and production stays."""
    import shutil
    from dataclasses import replace

    from tasks.common.tracking import ArtifactRef, start_pipeline_run
    from tasks.stages import evaluate

    config = renamed(run, "labels-differ")
    submit(run, config, run.evaluation, run.served, run.gates)  # v1: the four lowercase labels
    folder = tmp_path / "data"
    shutil.copytree(run.fetch(run.data.dataset), folder)
    upper = [name.upper() for name in run.label_names]
    (folder / "label_names.json").write_text(json.dumps(upper))
    data = replace(run.data, dataset=ArtifactRef(run.run_id, "data", str(folder)))
    evaluation = evaluate(config, data, run.trained, start_pipeline_run(config))
    assert evaluation.production_version == "1"
    assert evaluation.production_refusal == (
        f"production v1 predicts the labels {sorted(run.label_names)} but this data has "
        f"{sorted(upper)}; a champion comparison needs the same label set: fix the labels, or "
        "promote the new version by hand (promote --force) if the classes changed on purpose"
    )
    served = replace(run.served, answers=[a.upper() for a in run.served.answers])
    result = submit(run, config, evaluation, served, run.gates)
    assert not result.promoted and result.comparison is None
    assert result.reason == f"cannot compare with production: {evaluation.production_refusal}"
    gate = next(g for g in result.gates if g.name == "champion_comparable_with_production")
    assert not gate.passed
    assert aliases(run, "labels-differ") == {"challenger": "2", "production": "1"}
