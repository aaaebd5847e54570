"""SmoothQuant on an fp32 ONNX graph: move an activation's outlier channels into the weight.

For a node computing X W with W a weight of K input rows (a MatMul, or the packed QKV weight of
a fused Attention), each input channel j gets a scale

    s_j = a_j ** alpha / w_j ** (1 - alpha)

from a_j, the largest |X[..., j]| over the calibration rows, and w_j, the largest |W[j, :]|
(Xiao et al., 2023). The graph then computes (X / s) (diag(s) W): the same function in fp32,
but the activation that int8 quantizes per tensor is flatter, and the weight, quantized per
output channel, takes the scales in. The 1/s is a Mul node just before the node: one
element-wise op (folding it into the producer is not general: a LayerNorm's output also feeds
the residual, a Gelu is not linear).

Whether it helps is measured, not assumed (mixed_precision.py: a node is smoothed only where
smoothing halves the error its int8 form adds). Limits: needs calibration rows (the task kind
must provide them), weights of rank 2, and the node's activation as its first input.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from tasks.common.onnx import ONNX_FILE, copy_missing_files, rows_by_length

SMOOTHABLE_OPS = ("MatMul", "Attention")
MIN_MAGNITUDE = 1e-5  # a channel that is all zeros (or a zero weight row) keeps scale 1
SCALE_SUFFIX = "_smooth_scale"
MUL_SUFFIX = "_smooth"
PROBE_BATCH_ROWS = 32  # calibration rows of one length run together while maxima are measured


def smoothable(model_file: Path, nodes: Iterable[str]) -> list[str]:
    """Those of nodes that SmoothQuant can rewrite: MatMul/Attention reading a rank-2 weight
    that no other node reads (scaling its rows would change the other reader)."""
    graph = onnx.load(str(model_file), load_external_data=False).graph
    weights = {i.name: i for i in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    able = {
        node.name
        for node in graph.node
        if node.op_type in SMOOTHABLE_OPS
        and len(node.input) > 1
        and node.input[1] in weights
        and len(weights[node.input[1]].dims) == 2
        and readers[node.input[1]] == 1
    }
    return [name for name in nodes if name in able]


def activation_maxima(
    model_file: Path, nodes: Sequence[str], rows, work_dir: Path
) -> dict[str, np.ndarray]:
    """node -> the largest |value| of each channel (last axis) of its first input, over the
    calibration rows (rows of equal length run together, up to PROBE_BATCH_ROWS: never
    padded)."""
    if not nodes:
        return {}
    model = onnx.load(str(model_file))
    by_name = {n.name: n for n in model.graph.node}
    tensors = sorted({by_name[name].input[0] for name in nodes})
    known = {o.name for o in model.graph.output}
    for tensor in tensors:
        if tensor not in known:
            model.graph.output.append(helper.make_empty_tensor_value_info(tensor))
    augmented = work_dir / "smoothing_probe.onnx"
    onnx.save(model, str(augmented), save_as_external_data=True, location="smoothing_probe.data")
    del model
    session = ort.InferenceSession(str(augmented), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    maxima: dict[str, np.ndarray] = {}
    for group in rows_by_length(rows):
        for start in range(0, len(group), PROBE_BATCH_ROWS):  # rows of one length: no padding
            chunk = group[start : start + PROBE_BATCH_ROWS]
            feed = {k: np.concatenate([row[k] for row in chunk]) for k in chunk[0] if k in wanted}
            for tensor, value in zip(tensors, session.run(tensors, feed), strict=True):
                channel_max = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
                old = maxima.get(tensor)
                maxima[tensor] = channel_max if old is None else np.maximum(old, channel_max)
    del session
    augmented.unlink()
    (work_dir / "smoothing_probe.data").unlink(missing_ok=True)
    return {name: maxima[by_name[name].input[0]] for name in nodes}


def smoothing_scales(activation_max: np.ndarray, weight: np.ndarray, alpha: float) -> np.ndarray:
    """s per input channel: a ** alpha / w ** (1 - alpha); 1 where a channel or row is zero."""
    a = activation_max.astype(np.float64)
    w = np.abs(weight).max(axis=1).astype(np.float64)
    live = (a > MIN_MAGNITUDE) & (w > MIN_MAGNITUDE)
    scales = np.ones_like(a)
    scales[live] = a[live] ** alpha / w[live] ** (1 - alpha)
    return scales.astype(np.float32)


def smooth_graph(src_dir: Path, dst_dir: Path, maxima: dict[str, np.ndarray], alpha: float) -> Path:
    """dst_dir: src_dir's fp32 graph with every node in maxima smoothed (its weight rows times s,
    a Mul by 1/s on its activation), plus src_dir's config and tokenizer files."""
    model = onnx.load(str(src_dir / ONNX_FILE))
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    for position in reversed(range(len(graph.node))):
        node = graph.node[position]
        if node.name not in maxima:
            continue
        weight_name = node.input[1]  # smoothable(): a rank-2 weight this node alone reads
        weight = numpy_helper.to_array(weights[weight_name])
        scales = smoothing_scales(maxima[node.name], weight, alpha)
        weights[weight_name].CopyFrom(
            numpy_helper.from_array((weight * scales[:, None]).astype(weight.dtype), weight_name)
        )
        inverse = numpy_helper.from_array(1.0 / scales, node.name + SCALE_SUFFIX)
        graph.initializer.append(inverse)
        smoothed = node.name + MUL_SUFFIX + "_output"
        mul = helper.make_node(
            "Mul", [node.input[0], inverse.name], [smoothed], name=node.name + MUL_SUFFIX
        )
        node.input[0] = smoothed
        graph.node.insert(position, mul)
    if dst_dir.exists():
        shutil.rmtree(dst_dir)
    dst_dir.mkdir(parents=True)
    external = (src_dir / f"{ONNX_FILE}_data").exists()
    onnx.save(
        model,
        str(dst_dir / ONNX_FILE),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=f"{ONNX_FILE}_data",
    )
    copy_missing_files(src_dir, dst_dir)
    return dst_dir
