"""The classifier's last layer computed for the pooled token only (tasks/common/first_token.py):
the same logits with fewer rows, on the export stage's fused graph and on a plain export;
graphs of another shape are left alone."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tasks.classification.data import load_split
from tasks.classification.modeling import session_logits
from tasks.common.first_token import first_token_file, first_token_only
from tasks.common.models import load_tokenizer
from tasks.common.onnx import ONNX_FILE, open_session, optimum_export


def logits(run, folder, texts):
    session = open_session(folder / ONNX_FILE)
    tokenizer = load_tokenizer(run.config.model)
    return session_logits(session, tokenizer, texts, run.config.data.max_length, batch_size=16)


def test_the_last_layer_computes_the_pooled_token_only_with_the_same_logits(run, tmp_path):
    merged = run.fetch(run.merged.model)
    plain = optimum_export(merged, tmp_path / "plain", "text-classification", None)
    pruned = tmp_path / "pruned"
    shutil.copytree(plain, pruned)
    count = first_token_file(pruned / ONNX_FILE)
    assert count >= 8  # the last layer's output projection, residual Adds, norms and MLP
    graph = onnx.load(str(pruned / ONNX_FILE)).graph
    gathered = {n.output[0] for n in graph.node if n.name.endswith("_first_token_gather")}
    readers = {n.name for n in graph.node if any(i in gathered for i in n.input)}
    assert any(name.endswith("layer.1/attention/output/dense/MatMul") for name in readers)
    assert not any("layer.0/" in name for name in readers)  # earlier layers: every token
    texts = list(load_split(run.stage, run.data, "test")["text"])
    np.testing.assert_allclose(logits(run, pruned, texts), logits(run, plain, texts), atol=1e-6)
    assert first_token_file(pruned / ONNX_FILE) == 0  # once is all: one token left


def test_the_export_stage_ships_the_pass_and_its_parity_gate_measured_it(run, tmp_path):
    assert run.client.get_run(run.run_id).data.metrics["onnx/first_token_nodes"] >= 8
    parity = next(g for g in run.onnx.gates if g.name == "onnx_parity_max_abs_diff")
    assert parity.passed and parity.value <= 1e-4
    folder = tmp_path / "fused"
    shutil.copytree(run.fetch(run.onnx.model), folder)
    assert first_token_file(folder / ONNX_FILE) == 0  # the stage's graph has it already


def _graph(gather_axis: int, output_hidden: bool) -> onnx.ModelProto:
    """x [B, S, 4] -> MatMul W -> Add b -> Gather(axis, 0) -> y; optionally the hidden states
    are a graph output too (then every token's row is needed)."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "b"], ["hb"], name="add"),
        helper.make_node("Gather", ["hb", "zero"], ["y"], name="pool", axis=gather_axis),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if output_hidden:
        outputs.append(helper.make_tensor_value_info("hb", TensorProto.FLOAT, ["B", "S", 4]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 4])],
        outputs,
        [
            numpy_helper.from_array(np.eye(4, dtype=np.float32), "w"),
            numpy_helper.from_array(np.ones(4, dtype=np.float32), "b"),
            numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
        ],
        value_info=[
            helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", "S", 4]) for n in ("h", "hb")
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_graphs_of_another_shape_are_left_alone():
    assert first_token_only(_graph(gather_axis=1, output_hidden=False)) == 2  # the shape it wants
    for model in (_graph(1, output_hidden=True), _graph(0, output_hidden=False)):
        before = model.SerializeToString()
        assert first_token_only(model) == 0
        assert model.SerializeToString() == before
