"""Fused fp32 graphs, sensitivity-guided mixed precision and SmoothQuant, on the tiny BERT's
pipeline run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from tasks.classification.data import label_names, load_split
from tasks.classification.modeling import (
    load_classifier,
    predict_logits,
    session_logits,
)
from tasks.classification.quantize import ClassifierScorer, probe_texts
from tasks.common.config import QuantizeConfig
from tasks.common.mixed_precision import kl_divergence, mix_sizes, units
from tasks.common.models import load_tokenizer
from tasks.common.onnx import (
    CPU,
    CPU_SESSION_CONFIG,
    ONNX_FILE,
    calibrate,
    fuse_graph,
    graph_op_types,
    instruction_set,
    open_session,
    optimum_export,
    rows_by_length,
    session_config,
    session_options,
    weighted_nodes,
)
from tasks.common.quantization import (
    build_variants,
    choice_json,
    fp32_nodes_tag,
    smoothed_nodes_tag,
)
from tasks.common.smoothing import (
    activation_maxima,
    smooth_graph,
    smoothable,
    smoothing_scales,
)

FRAGILE = "/bert/encoder/layer.1/attention/output/dense/MatMul"


def test_export_ships_a_fused_graph_that_matches_pytorch(run):
    onnx_dir = run.fetch(run.onnx.model)
    ops = graph_op_types(onnx_dir / ONNX_FILE)
    layers = 2  # the tiny BERT's
    assert ops.get("Attention") == layers
    # served on CPU: the residual Add and LayerNormalization stay apart (CPU_SESSION_CONFIG)
    assert "SkipLayerNormalization" not in ops and ops.get("LayerNormalization") == 2 * layers
    assert ops.get("BiasGelu", 0) + ops.get("FastGelu", 0) + ops.get("Gelu", 0) == layers
    assert ops.get("EmbedLayerNormalization") == 1
    assert "Softmax" not in ops and "Erf" not in ops  # the unfused pieces are gone
    metrics = run.client.get_run(run.run_id).data.metrics
    assert metrics["onnx/fused.Attention"] == layers
    # the parity gate measured the fused graph: recompute it here
    texts = load_split(run.stage, run.data, "test")["text"]
    tokenizer = load_tokenizer(run.config.model)
    merged = load_classifier(str(run.fetch(run.merged.model)), label_names(run.stage, run.data))
    torch_logits = predict_logits(merged, tokenizer, texts, run.config.data.max_length)
    session = open_session(onnx_dir / ONNX_FILE)
    onnx_logits = session_logits(session, tokenizer, texts, run.config.data.max_length)
    diff = float(np.max(np.abs(onnx_logits - torch_logits)))
    assert diff <= 1e-4
    assert np.array_equal(onnx_logits.argmax(-1), torch_logits.argmax(-1))
    parity = next(g for g in run.onnx.gates if g.name == "onnx_parity_max_abs_diff")
    assert parity.passed and parity.value == pytest.approx(diff, abs=2e-6)


def make_fragile(src, dst) -> None:
    """dst: src's fused graph with one MatMul that int8 breaks and fp32 does not notice.

    Channel 0 of layer 1's attention context (its value projection) is scaled by 1e-3 and the
    matching input row of the attention output MatMul by 1e3: the same function in fp32, but
    each int8 weight column's scale is then set by that one huge row, so every other weight of
    the MatMul rounds to zero."""
    shutil.copytree(src, dst)
    model = onnx.load(str(dst / ONNX_FILE))
    graph, weights = model.graph, {i.name: i for i in model.graph.initializer}
    attention = next(n for n in graph.node if n.op_type == "Attention" and n.name.endswith("_1"))
    matmul = next(n for n in graph.node if n.name == FRAGILE)
    hidden = numpy_helper.to_array(weights[matmul.input[1]]).shape[0]

    def scale(name: str, index, factor: float) -> None:
        array = numpy_helper.to_array(weights[name]).copy()
        array[index] *= factor
        weights[name].CopyFrom(numpy_helper.from_array(array, name))

    scale(attention.input[1], (slice(None), 2 * hidden), 1e-3)  # V column 0 of packed QKV
    scale(attention.input[2], 2 * hidden, 1e-3)  # its bias
    scale(matmul.input[1], 0, 1e3)  # the output projection's input row 0
    onnx.save(model, str(dst / ONNX_FILE))


def fragile_search(run, tmp_path, **quantize):
    """The fragile graph (in tmp_path/fp32), a config trying dynamic_per_channel only (plus the
    quantize settings given) and the test split's scorer."""
    update = {"variants": ["dynamic_per_channel"], **quantize}
    config = run.config.model_copy(
        update={"quantize": run.config.quantize.model_copy(update=update)}
    )
    fp32_dir = tmp_path / "fp32"
    make_fragile(run.fetch(run.onnx.model), fp32_dir)
    scorer = ClassifierScorer(
        config,
        load_tokenizer(config.model),
        load_split(run.stage, run.data, "test"),
        probe_texts(run.stage, run.data, config.quantize.sensitivity_probe_samples),
    )
    return config, fp32_dir, scorer


def test_the_fragile_matmul_is_kept_in_fp32_and_the_mix_passes(run, tmp_path):
    config, fp32_dir, scorer = fragile_search(run, tmp_path)
    fp32_logits = scorer.probe(run.fetch(run.onnx.model))
    assert kl_divergence(fp32_logits, scorer.probe(fp32_dir)) < 1e-8  # same function in fp32

    choice = build_variants(config, fp32_dir, tmp_path / "out", scorer, calibration=lambda: None)

    plain, *mixes = choice.candidates
    assert plain.name == "dynamic_per_channel" and not plain.passed
    assert choice.sensitivity_base == "dynamic_per_channel"
    top = choice.sensitivity[0]
    assert top.nodes == (FRAGILE,)
    assert top.divergence > 10 * choice.sensitivity[1].divergence
    assert mixes and mixes[-1].passed and all(not m.passed for m in mixes[:-1])
    passing = mixes[-1]
    assert FRAGILE in passing.kept_fp32
    assert passing.kept_fp32[FRAGILE].startswith("sensitivity rank 1 of ")
    assert all(g.passed for g in passing.gates)
    assert passing.scores["top1_agreement"] >= config.quantize.min_top1_agreement
    # the head is never int8, in every candidate
    head = [
        n
        for n, _ in weighted_nodes(fp32_dir / ONNX_FILE, ["MatMul", "Gemm"])
        if "/pooler/" in n or "classifier" in n
    ]
    assert head and all(n in c.kept_fp32 for c in choice.candidates for n in head)
    # ... and in the graphs: no integer kernel computes a head node (the dynamic quantizer
    # renames a Gemm to <Gemm>_MatMul before it reads the exclusions)
    int8_kernels = {"MatMulInteger", "DynamicQuantizeMatMul", "QGemm", "QLinearMatMul"}
    for candidate in choice.candidates:
        quantized_head = [
            node.name
            for node in onnx.load(candidate.model_file).graph.node
            if node.op_type in int8_kernels and node.name.startswith(tuple(head))
        ]
        assert quantized_head == [], (candidate.name, quantized_head)
    # the mix's graph has the fragile MatMul in fp32 and the rest in int8
    ops = {n.name: n.op_type for n in onnx.load(passing.model_file).graph.node}
    assert ops[FRAGILE] == "MatMul"
    assert graph_op_types(passing.model_file).get("QAttention") == 2
    record = choice_json(choice, "p50_ms")
    assert record["sensitivity"]["units"][0] == {
        "nodes": [FRAGILE],
        "kl_divergence": top.divergence,
    }
    assert json.loads(json.dumps(record))["candidates"][-1]["kept_fp32"] == passing.kept_fp32
    if choice.chosen is passing:  # int8 beats fp32 at batch 1 only on a quiet machine
        assert FRAGILE in fp32_nodes_tag(choice.chosen)


def test_search_bounds():
    assert mix_sizes(19, 4) == [1, 2, 4, 8]
    assert mix_sizes(3, 4) == [1, 2, 3]
    assert mix_sizes(1, 4) == [1]
    nodes = [f"n{i}" for i in range(10)]
    assert units(nodes, 24) == [(n,) for n in nodes]
    assert units(nodes, 4) == [("n0", "n1", "n2"), ("n3", "n4", "n5"), ("n6", "n7", "n8"), ("n9",)]


def test_kl_divergence_values():
    logits = np.log(np.array([[0.5, 0.5], [0.9, 0.1]]))
    assert kl_divergence(logits, logits) == pytest.approx(0.0, abs=1e-12)
    flipped = logits[:, ::-1]
    expected = (0.0 + (0.9 * np.log(9) + 0.1 * np.log(1 / 9))) / 2
    assert kl_divergence(logits, flipped) == pytest.approx(expected)


def test_calibration_rows_are_grouped_by_length_never_padded():
    rows = [
        {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1]},
        {"input_ids": [4, 5], "attention_mask": [1, 1]},
        {"input_ids": [6, 7, 8], "attention_mask": [1, 1, 1]},
    ]
    groups = rows_by_length(rows)
    assert [len(g) for g in groups] == [1, 2]
    assert groups[0][0]["input_ids"].tolist() == [[4, 5]]
    assert groups[1][1]["input_ids"].dtype == np.int64
    assert groups[1][1]["input_ids"].tolist() == [[6, 7, 8]]


def test_static_percentile_calibration_on_the_fused_graph(run, tmp_path):
    train = load_split(run.stage, run.data, "train")
    rows = train.select(range(48)).select_columns(["input_ids", "attention_mask", "token_type_ids"])
    fp32_dir = run.fetch(run.onnx.model)
    isa = instruction_set()
    percentile = calibrate(fp32_dir, tmp_path, "static_per_channel", isa, rows, "percentile", 99.0)
    minmax = calibrate(fp32_dir, tmp_path, "static_per_channel", isa, rows, "minmax")
    assert set(percentile.keys()) == set(minmax.keys()) and len(minmax.keys()) > 10

    def width(ranges, tensor) -> float:
        low, high = ranges[tensor].range_value
        return float(np.max(high) - np.min(low))

    widths = [(width(minmax, t), width(percentile, t)) for t in minmax.keys()]
    assert all(p <= m * 1.01 + 1e-6 for m, p in widths)  # percentiles clip the tails
    assert sum(p < 0.99 * m for m, p in widths) > len(widths) // 2
    assert not (tmp_path / "augmented_model.onnx").exists()


def test_mixed_precision_base_must_be_a_variant():
    with pytest.raises(ValueError, match="mixed_precision_base 'dynamic_per_channel' is not one"):
        QuantizeConfig(variants=["static_per_channel"])
    assert QuantizeConfig(variants=["static_per_channel"], mixed_precision_base=None)


def test_skip_layer_norm_is_fused_only_for_cuda(run, tmp_path):
    """CPU: no SkipLayerNormalization in our fusion pass nor in the session's own (its CPU
    kernel is slower than the norm plus an Add); CUDA keeps the fusion."""
    merged = run.fetch(run.merged.model)
    for device, fused in (("cpu", False), ("cuda", True)):
        folder = optimum_export(merged, tmp_path / device, "text-classification", None)
        counts = fuse_graph(folder, "bert", device)
        assert (counts.get("SkipLayerNormalization", 0) > 0) is fused
        assert session_config(device) == ({} if fused else CPU_SESSION_CONFIG)
    # the CPU session does not fuse them either (the session's optimized graph, saved)
    options = session_options(1, "cpu")
    options.optimized_model_filepath = str(tmp_path / "session.onnx")
    ort.InferenceSession(str(tmp_path / "cpu" / ONNX_FILE), options, providers=[CPU])
    assert "SkipLayerNormalization" not in graph_op_types(tmp_path / "session.onnx")
    plain = ort.SessionOptions()  # onnxruntime's default does fuse them: the setting matters
    plain.optimized_model_filepath = str(tmp_path / "default.onnx")
    ort.InferenceSession(str(tmp_path / "cpu" / ONNX_FILE), plain, providers=[CPU])
    assert graph_op_types(tmp_path / "default.onnx").get("SkipLayerNormalization", 0) > 0


def calibration_rows(run, count: int = 48):
    train = load_split(run.stage, run.data, "train")
    columns = [
        c for c in ("input_ids", "attention_mask", "token_type_ids") if c in train.column_names
    ]
    return train.select(range(count)).select_columns(columns)


def test_smoothing_keeps_the_fp32_function(run, tmp_path):
    fp32_dir = run.fetch(run.onnx.model)
    model_file = fp32_dir / ONNX_FILE
    nodes = smoothable(
        model_file, [name for name, _ in weighted_nodes(model_file, ["MatMul", "Attention"])]
    )
    assert any("/attention/output/dense/" in n for n in nodes) and any(
        "Attention" in n for n in nodes
    )
    maxima = activation_maxima(model_file, nodes, calibration_rows(run), tmp_path)
    assert list(tmp_path.iterdir()) == []  # the probe graph is gone
    assert all(m.ndim == 1 and (m >= 0).all() and m.max() > 0 for m in maxima.values())
    smoothed = smooth_graph(fp32_dir, tmp_path / "smoothed", maxima, alpha=0.5)
    graph = onnx.load(str(smoothed / ONNX_FILE)).graph
    muls = {n.name: n for n in graph.node if n.name.endswith("_smooth")}
    assert set(muls) == {f"{n}_smooth" for n in nodes}
    by_name = {n.name: n for n in graph.node}
    assert all(by_name[n].input[0] == muls[f"{n}_smooth"].output[0] for n in nodes)
    before = {
        i.name: numpy_helper.to_array(i) for i in onnx.load(str(model_file)).graph.initializer
    }
    after = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    assert all(
        not np.allclose(before[by_name[n].input[1]], after[by_name[n].input[1]]) for n in nodes
    )
    texts = load_split(run.stage, run.data, "test")["text"]
    tokenizer = load_tokenizer(run.config.model)
    length = run.config.data.max_length
    plain = session_logits(open_session(model_file), tokenizer, texts, length)
    rewritten = session_logits(open_session(smoothed / ONNX_FILE), tokenizer, texts, length)
    assert float(np.max(np.abs(plain - rewritten))) <= 1e-4  # the same function in fp32
    assert (smoothed / "config.json").exists()  # a loadable folder


def test_smoothing_scales():
    weight = np.array([[1.0, -4.0], [0.0, 0.0], [2.0, 1.0]], dtype=np.float32)
    activation = np.array([16.0, 3.0, 0.0], dtype=np.float32)
    scales = smoothing_scales(activation, weight, alpha=0.5)
    # s = sqrt(a / w) per input row: 16 / 4 -> 2; a zero weight row or channel keeps 1
    assert scales.tolist() == [2.0, 1.0, 1.0]
    assert smoothing_scales(activation, weight, alpha=0.75)[0] == pytest.approx(16**0.75 / 4**0.25)


def test_smooth_alpha_is_a_share_or_off():
    assert QuantizeConfig().smooth_alpha == 0.5
    assert QuantizeConfig(smooth_alpha=None).smooth_alpha is None
    for wrong in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="smooth_alpha"):
            QuantizeConfig(smooth_alpha=wrong)


def test_a_fragile_matmul_that_smoothing_fixes_ships_smoothed_in_int8(run, tmp_path):
    """The fragile MatMul's trouble is one input channel tiny and its weight row huge: the
    scales SmoothQuant computes undo exactly that, so the search smooths it (int8, faster)
    instead of keeping it in fp32."""
    config, fp32_dir, scorer = fragile_search(run, tmp_path)
    rows = calibration_rows(run)

    choice = build_variants(config, fp32_dir, tmp_path / "out", scorer, calibration=lambda: rows)

    plain, *mixes = choice.candidates
    assert not plain.passed
    top = choice.sensitivity[0]
    assert top.nodes == (FRAGILE,) and top.smoothing_helps
    assert top.smoothed < 0.1 * top.divergence
    first = mixes[0]  # every node smoothing helps smoothed, nothing else in fp32
    assert first.name == "smooth0_dynamic_per_channel" and first.passed, first.gates
    assert len(mixes) == 1  # no fp32 mix was needed
    assert set(first.kept_fp32) == set(plain.kept_fp32)  # the head alone
    assert first.smoothed[FRAGILE].startswith(
        f"SmoothQuant (alpha 0.5): KL {top.divergence:.3g} -> "
    )
    helped = {n for s in choice.sensitivity if s.smoothing_helps for n in s.nodes}
    assert set(first.smoothed) == helped
    graph = onnx.load(first.model_file).graph
    ops = {n.name: n.op_type for n in graph.node}
    assert ops[f"{FRAGILE}_smooth"] == "Mul" and ops.get(FRAGILE) != "MatMul"
    assert not (tmp_path / "out" / "calibration" / "smooth0_dynamic_per_channel").exists()
    record = json.loads(json.dumps(choice_json(choice, "p50_ms")))
    assert record["candidates"][1]["smoothed"] == first.smoothed
    assert record["sensitivity"]["units"][0]["kl_divergence_smoothed"] == top.smoothed
    if choice.chosen is first:
        assert record["smoothed_nodes"] == first.smoothed
        assert FRAGILE in smoothed_nodes_tag(choice.chosen)


def test_without_calibration_rows_or_with_smoothing_off_nothing_is_smoothed(run, tmp_path):
    config, fp32_dir, scorer = fragile_search(run, tmp_path, smooth_alpha=None)
    rows = calibration_rows(run)
    choice = build_variants(config, fp32_dir, tmp_path / "out", scorer, calibration=lambda: rows)
    assert all(s.smoothed is None for s in choice.sensitivity)
    assert all(not c.smoothed and not c.name.startswith("smooth") for c in choice.candidates)
    assert FRAGILE in choice.candidates[-1].kept_fp32


def test_a_static_base_is_smoothed_and_calibrated_on_the_smoothed_graph(run, tmp_path):
    """Static int8 reads activation ranges for the Mul outputs smoothing adds: the smoothed
    graph is calibrated on its own (the fp32 graph's ranges do not name those tensors)."""
    config, fp32_dir, scorer = fragile_search(
        run,
        tmp_path,
        variants=["static_per_channel"],
        mixed_precision_base="static_per_channel",
        calibration_method="minmax",
    )
    rows = calibration_rows(run)
    choice = build_variants(config, fp32_dir, tmp_path / "out", scorer, calibration=lambda: rows)
    plain, *mixes = choice.candidates
    assert not plain.passed and choice.sensitivity[0].nodes == (FRAGILE,)
    assert choice.sensitivity[0].smoothing_helps
    first = mixes[0]
    assert first.name == "smooth0_static_per_channel" and FRAGILE in first.smoothed
    assert first.passed, first.gates
    graph = onnx.load(first.model_file).graph
    producer = {out: node for node in graph.node for out in node.output}
    fragile = next(n for n in graph.node if n.name == FRAGILE)  # QDQ: the MatMul stays
    assert [producer[i].op_type for i in fragile.input] == ["DequantizeLinear"] * 2
    quantized_inputs = {i for n in graph.node if n.op_type == "QuantizeLinear" for i in n.input}
    assert f"{FRAGILE}_smooth_output" in quantized_inputs
