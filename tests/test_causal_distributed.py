"""causal_lm on two DDP ranks equals one process: packed rows, the loss normalized by the
response tokens of the whole global batch (not a per-rank mean of means)."""

from __future__ import annotations

import pytest
from test_causal_pipeline import causal_config_dict, pairs_csv  # noqa: F401  (a fixture)
from test_distributed import adapter_weights, ddp, losses

from tasks.common.config import apply_overrides, config_from_dict
from tasks.common.tracking import start_pipeline_run
from tasks.stages import prepare_data, train_lora
from testkit.tiny import build_tiny_decoder

STEPS = [
    "data.packing=true",
    "data.split.validation=0",
    "train.max_steps=5",
    "train.logging_steps=1",
    "train.batch_size=4",
    "train.checkpoint_steps=0",
    "output.keep=true",
    "train.precision=fp32",  # 1e-4 between topologies: bf16 autocast rounds per batch shape
]


def test_ddp_causal_lm_with_packing_equals_one_process(tmp_path, demo_frame, pairs_csv):  # noqa: F811
    model_dir = build_tiny_decoder(tmp_path / "model", list(demo_frame["text"]), "llama")
    runs = {}
    for name, extra in (("single", []), ("ddp", ddp())):
        tree = causal_config_dict(tmp_path / name, model_dir, pairs_csv)
        config = config_from_dict(apply_overrides(tree, [*STEPS, *extra]))
        run_id = start_pipeline_run(config)
        data = prepare_data(config, run_id)
        runs[name] = (config, run_id, train_lora(config, data, run_id))
    (config, run_id, single), (ddp_config, ddp_run, trained) = runs["single"], runs["ddp"]
    expected, got = losses(config, run_id), losses(ddp_config, ddp_run)
    assert sorted(got) == sorted(expected) == list(range(1, 6))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-4), step
    ours, theirs = adapter_weights(single), adapter_weights(trained)
    for name in ours:
        assert (ours[name] - theirs[name]).abs().max() <= 1e-5, name
