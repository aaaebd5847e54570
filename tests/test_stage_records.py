"""A finished stage's record survives the trip through MLflow (what a resumed run reads)."""

from __future__ import annotations

from flows.retrain import STAGES
from tasks.common.resume import StageRecords
from tasks.common.tracking import start_pipeline_run


def test_every_stage_record_comes_back_equal(run):
    store = StageRecords(run.tracking.run(start_pipeline_run(run.config)))
    assert store.finished == set()
    for stage in STAGES:
        record = getattr(run, stage.output)
        store.save(stage.name, record)
    fresh = StageRecords(store.run)  # as a re-run sees it
    assert fresh.finished == {stage.name for stage in STAGES}
    for stage in STAGES:
        loaded = fresh.load(stage.name, stage.record)
        assert type(loaded) is stage.record
        assert loaded == getattr(run, stage.output), stage.name


def test_a_stage_that_did_not_finish_has_no_record(run):
    store = StageRecords(run.tracking.run(start_pipeline_run(run.config)))
    assert store.load("train_lora", STAGES[1].record) is None
