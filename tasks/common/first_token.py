"""Computing the last layer for the first token only, in a classifier's ONNX graph.

A BERT-style classifier reads one token of its last hidden states: the pooler (or the head)
gathers token 0. Everything after the last token-mixing node (the last Attention) works row
by row: the attention output projection, the residual Adds, the norms and the feed-forward
network. For such rows the other tokens are computed and thrown away. `first_token_only`
moves the pooler's Gather up, in front of those row-wise nodes, so they compute one row per
text instead of one per token: the same logits (each row's result does not depend on the
others), about an eighth less work for a 6-layer model, and the export's parity gate checks
the result. Graphs without that shape are left as they are.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
from onnxruntime.transformers.onnx_model import OnnxModel

# Nodes that compute each token's row from that row alone (given weights that are initializers).
ROW_WISE = {
    "Add",
    "Sub",
    "Mul",
    "Div",
    "MatMul",
    "LayerNormalization",
    "SkipLayerNormalization",
    "BiasGelu",
    "Gelu",
    "FastGelu",
    "Erf",
    "Tanh",
    "Relu",
    "Sqrt",
}


def _constants(graph: onnx.GraphProto) -> set[str]:
    """Names of initializers, Constant nodes' outputs and Identity copies of either (the
    exporter shares equal weights and names the others through Identity nodes)."""
    names = {i.name for i in graph.initializer}
    for node in graph.node:  # graph order: an Identity comes after what it copies
        if node.op_type == "Constant" or (node.op_type == "Identity" and node.input[0] in names):
            names.add(node.output[0])
    return names


def _value(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """An initializer's or a Constant node's value (None for anything else)."""
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name and node.attribute:
            if node.attribute[0].name == "value":
                return numpy_helper.to_array(node.attribute[0].t)
    return None


def _pooler_gather(graph: onnx.GraphProto, constants: set[str]) -> onnx.NodeProto | None:
    """The one Gather that takes token 0 (a constant scalar index) on axis 1."""
    found = []
    for node in graph.node:
        if node.op_type != "Gather" or node.input[1] not in constants:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        index = _value(graph, node.input[1]) if axis == 1 else None
        if index is not None and index.ndim == 0 and int(index) == 0:
            found.append(node)
    return found[0] if len(found) == 1 else None


def _row_wise_region(graph, gather, constants) -> list[onnx.NodeProto]:
    """The row-wise nodes whose outputs reach nothing but the gather (through each other)."""
    producer = {out: node for node in graph.node for out in node.output}
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    graph_outputs = {o.name for o in graph.output}
    region, stack = {}, [gather.input[0]]  # nodes by their first output
    while stack:  # every row-wise ancestor of the gathered tensor, up to token-mixing nodes
        node = producer.get(stack.pop())
        if node is None or node.output[0] in region or node.op_type not in ROW_WISE:
            continue
        if node.op_type == "MatMul" and node.input[1] not in constants:
            continue  # activation x activation (attention scores): mixes tokens
        region[node.output[0]] = node
        stack.extend(i for i in node.input if i not in constants)
    changed = True
    while changed:  # drop nodes whose outputs are also read outside the region
        changed = False
        for key, node in list(region.items()):
            readers = [c for out in node.output for c in consumers[out]]
            outside = [c for c in readers if c is not gather and c.output[0] not in region]
            if outside or graph_outputs.intersection(node.output):
                del region[key]
                changed = True
    return list(region.values())


def _leading_dims(graph: onnx.GraphProto, name: str) -> tuple | None:
    """(batch, sequence) dims of a tensor recorded as rank 3, else None."""
    infos = {v.name: v for v in (*graph.value_info, *graph.input, *graph.output)}
    info = infos.get(name)
    dims = info.type.tensor_type.shape.dim if info is not None else []
    if len(dims) != 3:
        return None
    return tuple(d.dim_param or d.dim_value for d in dims[:2])


def first_token_only(model: onnx.ModelProto) -> int:
    """Rewrite `model` in place so the row-wise nodes after the last token-mixing node compute
    token 0 only; returns how many nodes now do (0: the graph was left as it was)."""
    graph = model.graph
    constants = _constants(graph)
    gather = _pooler_gather(graph, constants)
    leading = _leading_dims(graph, gather.input[0]) if gather is not None else None
    if leading is None or not all(leading) or leading[1] == 1:
        return 0  # shapes unknown, or one token already
    region = _row_wise_region(graph, gather, constants)
    inside = {out for node in region for out in node.output}
    frontier = sorted(
        {i for node in region for i in node.input if i and i not in inside and i not in constants}
    )
    if not region or any(_leading_dims(graph, name) != leading for name in frontier):
        return 0  # an input that is not [batch, sequence, features] like the gathered one
    first = "first_token_index"
    graph.initializer.append(numpy_helper.from_array(np.array([0], dtype=np.int64), first))
    renamed = {name: f"{name}_first_token" for name in frontier}
    for name, new in renamed.items():  # each input from outside: its token 0 only, [B, 1, F]
        graph.node.append(
            helper.make_node("Gather", [name, first], [new], name=f"{new}_gather", axis=1)
        )
    for node in region:
        node.input[:] = [renamed.get(i, i) for i in node.input]
    _one_token_shapes(graph, inside, renamed)
    OnnxModel(model).topological_sort()  # the new Gathers before the nodes that read them
    return len(region)


def _one_token_shapes(graph: onnx.GraphProto, names: set[str], renamed: dict[str, str]) -> None:
    """The region's tensors and the gathered inputs hold one token: their recorded shapes
    say so (sequence axis 1), so later passes (the quantizer) read correct types and ranks."""
    infos = {v.name: v for v in graph.value_info}
    for old, new in renamed.items():
        source = infos.get(old) or next(v for v in (*graph.input, *graph.output) if v.name == old)
        copy = onnx.ValueInfoProto()
        copy.CopyFrom(source)
        copy.name = new
        graph.value_info.append(copy)
        names = names | {new}
    for info in graph.value_info:
        dims = info.type.tensor_type.shape.dim
        if info.name in names and len(dims) >= 2:
            dims[1].Clear()
            dims[1].dim_value = 1


def first_token_file(model_file: Path) -> int:
    """first_token_only on an ONNX file, in place (weights kept inside or beside it as they
    were); how many nodes now compute token 0 only."""
    external = Path(f"{model_file}_data").exists()
    model = onnx.load(str(model_file))
    if not model.graph.value_info:  # an unfused export: shapes the pass can read
        model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    count = first_token_only(model)
    if count:
        onnx.save(
            model,
            str(model_file),
            save_as_external_data=external,
            all_tensors_to_one_file=True,
            location=f"{model_file.name}_data",
        )
    return count
