"""Several pipeline runs at once on one SQLite store and output folder.

Same data and config, started together: one runs, the other says a run is in progress (exit 2)
and deletes nothing. Different configs, started together: both complete, each registers its
own version, neither touches the other's. The CLI runs are processes forked from one that
imported the CLI once (testkit/cli.py); each starts Prefect's temporary server, as users' do.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import yaml

from tasks.common.lease import Lease, RunInProgress
from tasks.common.runs import KEY_TAG, claim_run
from tasks.common.tracking import Tracking


def _start(cli, config_path: Path, tmp: Path, *extra: str):
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home")}
    # 20 s by default; on 2 busy cores the second start (after the first, while that one
    # trains) can need more
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
    return cli.start(["run", "--config", str(config_path), *extra], env=env)


def _write(config, tmp: Path, name: str) -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


@pytest.mark.e2e
def test_the_same_run_twice_at_once_runs_once(make_tiny_config, tmp_path, cli):
    config = make_tiny_config(tmp_path, ["train.epochs=1"])
    path = _write(config, tmp_path, "config.yaml")
    processes = [_start(cli, path, tmp_path), _start(cli, path, tmp_path)]
    outputs = [p.communicate(timeout=900) for p in processes]
    codes = sorted(p.returncode for p in processes)
    assert codes == [0, 2], [err[-2000:] for _, err in outputs]
    winner = next(out for (out, _), p in zip(outputs, processes, strict=True) if p.returncode == 0)
    loser = next(err for (_, err), p in zip(outputs, processes, strict=True) if p.returncode == 2)
    result = json.loads(winner[winner.index("{") :])
    assert result["status"] == "completed" and result["version"] == "1"
    assert (
        "error: a pipeline run with the same data and config is in progress: run "
        f"{result['run_id']}" in loser
    )
    assert "Traceback" not in loser
    tracking = Tracking.connect(config.tracking)
    runs = tracking.client.search_runs([tracking.experiment_id])
    assert [r.info.run_id for r in runs] == [result["run_id"]]  # the loser kept no run
    versions = tracking.client.search_model_versions("name='tiny-classifier'")
    assert [str(v.version) for v in versions] == ["1"]
    history = tracking.client.get_metric_history(result["run_id"], "train/loss")
    assert len(history) == len({m.step for m in history})  # logged once, not twice


@pytest.mark.e2e
def test_two_different_runs_at_once_both_complete(make_tiny_config, tmp_path, cli):
    paths = [
        _write(make_tiny_config(tmp_path, ["train.epochs=1", f"train.seed={seed}"]), tmp_path, n)
        for seed, n in ((1, "a.yaml"), (2, "b.yaml"))
    ]
    processes = [_start(cli, path, tmp_path) for path in paths]
    outputs = [p.communicate(timeout=900) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [err[-2000:] for _, err in outputs]
    results = [json.loads(out[out.index("{") :]) for out, _ in outputs]
    assert sorted(r["version"] for r in results) == ["1", "2"]
    tracking = Tracking.connect(make_tiny_config(tmp_path).tracking)
    client = tracking.client
    versions = {str(v.version): v for v in client.search_model_versions("name='tiny-classifier'")}
    assert sorted(versions) == ["1", "2"]  # nothing deleted that the other run owns
    assert {versions[r["version"]].run_id for r in results} == {r["run_id"] for r in results}
    production = client.get_model_version_by_alias("tiny-classifier", "production")
    assert production.tags["registration"] == "complete"
    runs = client.search_runs([tracking.experiment_id])
    assert len({r.data.tags[KEY_TAG] for r in runs}) == 2 and len(runs) == 2


def test_a_waiting_claim_gets_the_run_once_the_holder_is_done(make_tiny_config, tmp_path):
    config = make_tiny_config(tmp_path)
    tracking = Tracking.connect(config.tracking)
    first = claim_run(tracking, config, "key-1")
    assert not first.resumed and not first.skipped
    with pytest.raises(RunInProgress, match=rf"in progress: run {first.run_id} \(process "):
        claim_run(tracking, config, "key-1")
    tracking.client.set_terminated(first.run_id, "FAILED")  # it fails...
    threading.Timer(2.0, first.lease.release).start()  # ...and lets go of its lease
    start = time.monotonic()
    second = claim_run(tracking, config, "key-1", wait=True)
    assert time.monotonic() - start >= 1.5  # it waited for the release
    assert second.run_id == first.run_id and second.resumed  # and continues that run
    assert isinstance(second.lease, Lease)
    second.lease.release()
