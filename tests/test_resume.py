"""Training resumes from its last checkpoint after a crash, with the same losses."""

from __future__ import annotations

import pytest

import tasks.common.training as train_module
from tasks.common.tracking import Tracking, start_pipeline_run
from tasks.common.training import checkpoint_dir, last_complete_checkpoint
from tasks.stages import prepare_data, train_lora

STEPS = ["train.max_steps=8", "train.logging_steps=1", "train.checkpoint_steps=4"]


def losses(config, run_id: str) -> dict[int, float]:
    """The last logged loss per step (a resumed run logs some steps twice)."""
    history = Tracking.connect(config.tracking).client.get_metric_history(run_id, "train/loss")
    return {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}


def test_resume_after_a_crash_gives_the_same_losses(make_tiny_config, tmp_path, monkeypatch):
    config = make_tiny_config(tmp_path, STEPS)
    reference = start_pipeline_run(config)
    data = prepare_data(config, reference)
    train_lora(config, data, reference)

    crashed = start_pipeline_run(config)
    real_step = train_module.GuardedTrainer.training_step

    def crash_at_step_7(self, *args, **kwargs):
        if self.state.global_step == 6:
            raise RuntimeError("worker lost")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(train_module.GuardedTrainer, "training_step", crash_at_step_7)
    with pytest.raises(RuntimeError, match="worker lost"):
        train_lora(config, data, crashed)
    assert sorted(p.name for p in checkpoint_dir(config, crashed).iterdir()) == ["checkpoint-4"]
    monkeypatch.setattr(train_module.GuardedTrainer, "training_step", real_step)

    result = train_lora(config, data, crashed)
    assert result.global_steps == 8
    client = Tracking.connect(config.tracking).client
    assert client.get_run(crashed).data.tags["train.resumed_from"] == "checkpoint-4"
    expected, got = losses(config, reference), losses(config, crashed)
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-4), step


def test_a_half_written_checkpoint_is_skipped(tmp_path):
    assert last_complete_checkpoint(tmp_path / "none") is None
    for step, complete in ((4, True), (8, True), (12, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-8")
