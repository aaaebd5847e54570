"""quantize: variants scored and timed against fp32, the fastest passing one ships, gates."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from tasks.classification.quantize import ClassifierScorer
from tasks.common.errors import GateFailed
from tasks.common.gates import evaluate_gate
from tasks.common.onnx import SERVED_FILE, convert_fp16, instruction_set, quantization_config
from tasks.common.quantization import RETIME_CALLS, Candidate, choose, retimed
from tasks.stages import quantize


def test_served_model_is_one_of_the_scored_variants(run):
    q = run.quantized
    assert (run.fetch(q.model) / SERVED_FILE).is_file()
    assert q.instruction_set == instruction_set()
    assert [c.name for c in q.candidates] == run.config.quantize.variants
    assert q.variant in {"fp32", *(c.name for c in q.candidates)}
    agreement, drop = q.gates
    assert agreement.name == "quantized_top1_agreement" and agreement.passed
    assert drop.value == pytest.approx(q.fp32_score - q.served_score)
    for c in q.candidates:
        assert 0 <= c.scores["top1_agreement"] <= 1 and c.p50_ms > 0
        assert (
            c.size_mb < 0.8 * run.client.get_run(run.run_id).data.metrics["quantize/fp32.size_mb"]
        )
    choice = json.loads(run.text("quantized/choice.json"))
    assert choice["chosen"] == q.variant and choice["reason"] == q.reason


def _candidate(name, p50, agreement=1.0, drop=0.0):
    gates = [
        evaluate_gate("quantized_top1_agreement", agreement, 0.97, ">="),
        evaluate_gate("quantized_accuracy_drop", drop, 0.005, "<="),
    ]
    return Candidate(
        name=name,
        model_file=f"{name}.onnx",
        scores={"accuracy": 0.9 - drop, "top1_agreement": agreement},
        p50_ms=p50,
        size_mb=1.0,
        gates=gates,
    )


def test_choose_keeps_the_fastest_variant_that_passes():
    fp32 = _candidate("fp32", 10.0)
    fast_but_wrong = _candidate("dynamic_per_tensor", 2.0, agreement=0.9)
    ok = _candidate("dynamic_per_channel", 3.0)
    slower_ok = _candidate("static_per_channel", 4.0)
    chosen, reason = choose(fp32, [fast_but_wrong, ok, slower_ok], fallback=True)
    assert chosen.name == "dynamic_per_channel"
    assert reason == (
        "dynamic_per_channel: fastest variant passing the gates, batch-1 p50 3.00 ms "
        "vs fp32 10.00 ms"
    )


def test_choose_serves_fp32_when_no_variant_beats_it():
    fp32 = _candidate("fp32", 1.0)
    chosen, reason = choose(fp32, [_candidate("dynamic_per_channel", 3.0)], fallback=True)
    assert chosen is fp32
    assert reason == "serving fp32: no variant passing the gates beat fp32's batch-1 p50 of 1.00 ms"


def test_the_choice_retimes_fp32_and_the_passing_candidates_side_by_side(tmp_path):
    """fp32 and each passing candidate make RETIME_CALLS timed requests (serve.latency_runs
    when larger), in turns; a failing candidate is not run and keeps its figure."""
    from types import SimpleNamespace

    calls: dict[str, list[int]] = {}

    class Scorer:
        def requests(self, folder):
            made = calls.setdefault(folder.name, [])
            return (lambda text: made.append(text)), list(range(7)), 1.0

    fp32 = replace(_candidate("fp32", 10.0), model_file=str(tmp_path / "fp32" / "model.onnx"))
    ok, wrong = (
        replace(c, model_file=str(tmp_path / c.name / "model.onnx"))
        for c in (_candidate("ok", 3.0), _candidate("wrong", 2.0, agreement=0.5))
    )
    for runs in (5, 150):
        calls.clear()
        serve = SimpleNamespace(latency_runs=runs, warmup_runs=2)
        fp32_again, (ok_again, wrong_again) = retimed(
            Scorer(), tmp_path / "fp32", fp32, [ok, wrong], serve
        )
        timed = max(RETIME_CALLS, runs)
        blocks = -(-timed // 10)
        assert calls.keys() == {"fp32", "ok"}
        assert all(len(made) == 2 + timed + blocks for made in calls.values())
        assert wrong_again is wrong and ok_again.p50_ms != ok.p50_ms and fp32_again.p50_ms != 10.0


def test_choose_fails_hard_without_fallback():
    fp32 = _candidate("fp32", 10.0)
    with pytest.raises(GateFailed, match=r"^gate quantized_accuracy_drop FAILED: measured 0.02"):
        choose(fp32, [_candidate("dynamic_per_channel", 3.0, drop=0.02)], fallback=False)


def test_quantization_that_flips_predictions_fails_its_gates(run, monkeypatch):
    real_score = ClassifierScorer.score

    def flipping(self, folder, name, reference):
        candidate, predictions = real_score(self, folder, name, reference)
        if name == "fp32":
            return candidate, predictions
        flipped = (predictions + 1) % len(run.label_names)
        scores = {**candidate.scores, "top1_agreement": 0.0}
        return replace(candidate, scores=scores), flipped

    monkeypatch.setattr(ClassifierScorer, "score", flipping)
    result = quantize(run.config, run.data, run.onnx, run.run_id)
    assert result.variant == "fp32" and result.reason.startswith(
        "serving fp32: every variant failed"
    )
    assert all(not c.passed for c in result.candidates)
    assert all(
        c.gates[0].describe().startswith("gate quantized_top1_agreement FAILED: measured 0,")
        for c in result.candidates
    )

    strict = run.config.model_copy(
        update={"quantize": run.config.quantize.model_copy(update={"fallback_to_fp32": False})}
    )
    with pytest.raises(GateFailed, match=r"^gate quantized_top1_agreement FAILED: measured 0, "):
        quantize(strict, run.data, run.onnx, run.run_id)


def test_instruction_set_choice():
    assert instruction_set({"avx2", "avx512f", "avx512_vnni"}, "x86_64") == "avx512_vnni"
    assert instruction_set({"avx2", "avx512f"}, "x86_64") == "avx512"
    assert instruction_set({"avx2"}, "x86_64") == "avx2"
    assert instruction_set(set(), "aarch64") == "arm64"


def test_variant_names_map_to_optimum_configs():
    static = quantization_config("static_per_tensor", "avx2")
    dynamic = quantization_config("dynamic_per_channel", "avx512_vnni")
    assert static.is_static and not static.per_channel
    assert not dynamic.is_static and dynamic.per_channel


def test_fp16_conversion_for_gpu_targets(run, tmp_path):
    import onnx

    out = convert_fp16(run.fetch(run.onnx.model) / "model.onnx", tmp_path / "fp16.onnx")
    graph = onnx.load(str(out)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64  # ids stay int
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # io stays fp32
    weights = [
        i
        for i in graph.initializer
        if i.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT)
    ]
    assert sum(i.data_type == onnx.TensorProto.FLOAT16 for i in weights) > 0.9 * len(weights)
