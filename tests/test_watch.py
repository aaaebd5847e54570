"""The data watch on the session's tiny pipeline run (its `production` model): what counts as
new rows, which drift it finds, which events it emits, and clear errors for a bad source.

The watch only reads the tiny run; it writes its reports to the `<experiment>-watch`
experiment of the same store.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import flows.watch as watch_module
from flows.watch import watch_flow
from tasks.common.errors import DataError
from tasks.watch.check import DATA_CHANGED, DRIFT_DETECTED, check


def watched(run, tmp_path: Path, frame: pd.DataFrame | None = None, **watch) -> object:
    """The tiny run's config watching a copy of its data (plus `frame`'s rows)."""
    data = pd.read_csv(run.config.data.path)
    if frame is not None:
        data = pd.concat([data, frame], ignore_index=True)
    source = tmp_path / "source.csv"
    data.to_csv(source, index=False)
    settings = {"source": str(source), "permutations": 200, **watch}
    return run.config.model_copy(update={"watch": run.config.watch.model_copy(update=settings)})


def unseen_rows(run, demo_frame: pd.DataFrame, n: int, label: str | None = None) -> pd.DataFrame:
    """Demo rows the tiny run never saw (its data holds 50 rows of 4 classes)."""
    seen = set(pd.read_csv(run.config.data.path)["text"])
    rows = demo_frame[~demo_frame["text"].isin(seen)]
    if label is not None:
        rows = rows[rows["label"] == label]
    return rows.head(n)


def test_the_same_data_is_unchanged_and_emits_nothing(run, tmp_path):
    config = watched(run, tmp_path)
    report = check(config, tmp_path / "cache")
    assert report.version is not None and report.production_run_id == run.run_id
    assert report.new_rows == 0 and report.removed_rows == 0
    assert report.events == [] and report.verdict.startswith("unchanged")
    assert report.tests == []  # nothing incoming to test


def test_enough_new_rows_mean_retrain_and_a_new_label_is_drift(run, tmp_path, demo_frame):
    new = unseen_rows(run, demo_frame, 60, label="returns")  # a class production never saw
    report = check(watched(run, tmp_path, new), tmp_path / "cache")
    assert report.new_rows == 60 and report.retrain
    assert report.events == [DATA_CHANGED, DRIFT_DETECTED]
    tests = {t["name"]: t for t in report.tests}
    assert tests["new_rows.label_balance"]["drifted"]
    assert "returns" in tests["new_rows.label_balance"]["detail"]["current_share"]
    assert report.verdict.startswith("retrain: 60 new or changed labelled rows")


def test_a_few_new_rows_like_the_old_ones_are_no_retrain(run, tmp_path, demo_frame):
    labels = pd.read_csv(run.config.data.path)["label"].unique()
    new = pd.concat([unseen_rows(run, demo_frame, 5, label) for label in labels])
    report = check(watched(run, tmp_path, new, min_new_rows=50), tmp_path / "cache")
    assert report.new_rows == len(new) == 20
    assert not report.retrain and DATA_CHANGED not in report.events
    assert not any(t["drifted"] for t in report.tests if t["name"].endswith("label_balance"))


def test_a_changed_label_counts_as_a_changed_row(run, tmp_path):
    data = pd.read_csv(run.config.data.path)
    changed = data.head(3).assign(label="account")
    changed = changed[data.head(3)["label"] != "account"]
    source = data.drop(changed.index)
    config = watched(run, tmp_path)
    pd.concat([source, changed]).to_csv(config.watch.source, index=False)
    report = check(config, tmp_path / "cache")
    assert report.new_rows == len(changed) == report.removed_rows


def test_drift_in_the_traffic_without_labelled_rows_is_an_alert(run, tmp_path):
    traffic = tmp_path / "traffic.csv"
    shouting = [f"ERROR 0x{i:04X} KERNEL PANIC " * 8 for i in range(120)]  # another world
    pd.DataFrame({"text": shouting}).to_csv(traffic, index=False)
    report = check(watched(run, tmp_path, traffic=str(traffic)), tmp_path / "cache")
    tests = {t["name"]: t for t in report.tests}
    assert tests["traffic.text_length"]["drifted"] and tests["traffic.embedding_mmd"]["drifted"]
    assert report.events == [DRIFT_DETECTED] and not report.retrain
    assert report.verdict.startswith("alert:") and "not enough labelled rows" in report.verdict


def test_traffic_like_the_training_texts_is_no_drift(run, tmp_path):
    traffic = tmp_path / "traffic.csv"
    pd.read_csv(run.config.data.path)[["text"]].sample(120, random_state=1).to_csv(
        traffic, index=False
    )
    report = check(watched(run, tmp_path, traffic=str(traffic)), tmp_path / "cache")
    assert [t["drifted"] for t in report.tests] == [False, False]
    assert report.events == [] and report.verdict.startswith("unchanged")


@pytest.mark.parametrize("problem", ["missing", "binary", "no_label_column"])
def test_a_missing_or_unreadable_source_is_a_clear_error_and_no_event(
    run, tmp_path, monkeypatch, problem
):
    config = watched(run, tmp_path)
    source = Path(config.watch.source)
    if problem == "missing":
        source.unlink()
    elif problem == "binary":
        source.write_bytes(b"\x00\xff\xfe" * 100)
    else:
        pd.DataFrame({"text": ["a b c"] * 5}).to_csv(source, index=False)
    emitted = []
    monkeypatch.setattr(watch_module, "emit_event", lambda **kw: emitted.append(kw))
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config.model_dump(mode="json")))
    with pytest.raises(DataError, match=str(source.name)):
        watch_flow.fn(str(path))
    assert emitted == []


def test_the_flow_logs_the_report_and_emits_events_about_the_model(
    run, tmp_path, demo_frame, monkeypatch
):
    config = watched(run, tmp_path, unseen_rows(run, demo_frame, 60, label="returns"))
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config.model_dump(mode="json")))
    emitted = []
    monkeypatch.setattr(watch_module, "emit_event", lambda **kw: emitted.append(kw))
    result = watch_flow.fn(str(path))
    assert [e["event"] for e in emitted] == [DATA_CHANGED, DRIFT_DETECTED]
    for event in emitted:
        assert event["resource"] == {
            "prefect.resource.id": "lora.model.tiny-classifier",
            "prefect.resource.name": "tiny-classifier",
            "lora.retrain": "true",
        }
        assert event["payload"]["new_rows"] == 60
        assert event["payload"]["data_sha256"] == result["source_sha256"]
    client = run.client
    watch_run = client.get_run(result["watch_run_id"])
    assert watch_run.data.tags["watch.events"] == f"{DATA_CHANGED},{DRIFT_DETECTED}"
    files = {a.path for a in client.list_artifacts(watch_run.info.run_id, "drift")}
    assert files == {"drift/report.json", "drift/report.md", "drift/tests.png"}
    report = Path(client.download_artifacts(watch_run.info.run_id, "drift/report.md")).read_text()
    assert "**retrain: 60 new or changed labelled rows" in report


def test_with_no_production_model_every_row_is_new(run, tmp_path):
    config = watched(run, tmp_path)
    config = config.model_copy(
        update={"registry": config.registry.model_copy(update={"model_name": "nobody-yet"})}
    )
    report = check(config, tmp_path / "cache")
    assert report.version is None and report.new_rows == report.rows == 200
    assert report.events == [DATA_CHANGED]


def test_a_triggered_retrain_records_its_event_and_announces_its_decision(
    tmp_path, make_tiny_config, monkeypatch
):
    import yaml

    import flows.retrain as retrain_module

    emitted = []
    monkeypatch.setattr(retrain_module, "emit_event", lambda **kw: emitted.append(kw))
    config = make_tiny_config(tmp_path, ["registry.promote=false"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    trigger = {"event": DATA_CHANGED, "id": "3f0c-event", "new_rows": "60"}
    result = retrain_module.retrain_flow(str(path), trigger=trigger)
    from tasks.common.tracking import Tracking

    client = Tracking.connect(config.tracking).client
    tags = client.get_run(result["run_id"]).data.tags
    assert tags["trigger.event"] == DATA_CHANGED and tags["trigger.event_id"] == "3f0c-event"
    recorded = client.download_artifacts(result["run_id"], "trigger/event.json")
    assert json.loads(Path(recorded).read_text()) == trigger
    [kept] = emitted
    assert kept["event"] == "lora.candidate.kept"
    assert kept["resource"]["prefect.resource.id"] == "lora.model.tiny-classifier"
    assert (
        kept["payload"]["version"] == result["version"] and "promote" in kept["payload"]["reason"]
    )


def test_the_alert_automations_are_created_once_each_on_the_server(prefect_api):
    from prefect import get_client
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.alerts import ALERT_TAG, create_alerts
    from tasks.common.errors import ConfigError

    with temporary_settings({PREFECT_API_URL: prefect_api}):
        block = CustomWebhookNotificationBlock(name="ops", url="http://127.0.0.1:9/alert")
        block_id = block.save("watch-test-ops", overwrite=True)
        for _ in range(2):  # a second call replaces, never duplicates
            names = create_alerts("custom-webhook/watch-test-ops")
        with get_client(sync_client=True) as client:
            ours = [a for a in client.read_automations() if ALERT_TAG in a.tags]
        assert sorted(a.name for a in ours) == sorted(names) and len(names) == 3
        for automation in ours:
            [action] = automation.actions
            assert action.type == "send-notification" and action.block_document_id == block_id
        drift = next(a for a in ours if a.name == "lora-drift-without-labels")
        assert drift.trigger.match.model_dump()["lora.retrain"] == "false"
        with pytest.raises(ConfigError, match="not found on the Prefect server"):
            create_alerts("custom-webhook/no-such-block")
        with pytest.raises(ConfigError, match="<block type>/<name>"):
            create_alerts("ops")
    with temporary_settings({PREFECT_API_URL: None}), pytest.raises(ConfigError, match="server"):
        create_alerts("custom-webhook/watch-test-ops")


def test_a_causal_lm_config_is_refused_with_the_reason(tmp_path):
    from tasks.common.config import config_from_dict
    from tasks.common.errors import ConfigError

    config = config_from_dict({"task": "causal_lm", "data": {"path": str(tmp_path / "x.csv")}})
    with pytest.raises(ConfigError, match="task causal_lm is not watched yet"):
        check(config, tmp_path / "cache")
