"""SIGKILL of the pipeline at every stage boundary and every step of registration, each
followed by a re-run, then promote and rollback interrupted too: the registry always ends
with `production` on a version whose gates all passed, its history consistent, and no process
of a killed run left behind (its servers, its served model, its watchdogs).

The kills come from the fault points of tasks/common/faults.py: LORA_RETRAIN_KILL_AT names the
point where the CLI process kills itself with SIGKILL, exactly as `kill -9` would.

The CLI runs are processes forked from one that imported the CLI once (testkit/cli.py); the
first kill runs `python -m flows.cli` itself. They share one Prefect server, but for the kills of
TEMPORARY_SERVER: those runs start Prefect's temporary server, which must die with them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from test_processes import marked_processes, wait_until

from tasks.common.faults import KILL_AT_ENV
from tasks.common.registry import HISTORY_TAG, gate_record, production_history

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny-classifier"
CHAIN = [  # each re-run resumes the same MLflow run and gets one step further
    "before:train_lora",
    "before:evaluate",
    "before:merge",
    "before:export_onnx",
    "before:quantize",
    "before:serve_check",
    "before:register",
    "register:after-version",
    "register:serving",
    "register:after-decision",
    "register:after-challenger",
    "registry:after-alias",
]
TEMPORARY_SERVER = {"before:train_lora", "register:serving", "registry:after-history"}


class Pipeline:
    """The CLI on one config and store; every process it starts carries a marker."""

    def __init__(self, tmp: Path, config_path: Path, client, launcher, api_url: str):
        self.tmp, self.config_path, self.client = tmp, config_path, client
        self.launcher, self.api_url = launcher, api_url
        self.mark = uuid.uuid4().hex

    def env(self, kill_at: str | None) -> dict:
        env = {**os.environ, "LORA_TEST_MARK": self.mark, "PREFECT_HOME": str(self.tmp / "ph")}
        env.pop(KILL_AT_ENV, None)
        env.pop("PREFECT_API_URL", None)
        if kill_at not in TEMPORARY_SERVER:
            env["PREFECT_API_URL"] = self.api_url
        return env | ({KILL_AT_ENV: kill_at} if kill_at else {})

    def cli(self, *args: str, kill_at: str | None = None, fork: bool = True):
        argv = [*args, "--config", str(self.config_path)]
        if fork:
            return self.launcher.run(argv, env=self.env(kill_at), timeout=900)
        return subprocess.run(
            [sys.executable, "-m", "flows.cli", *argv],
            cwd=ROOT,
            env=self.env(kill_at),
            capture_output=True,
            text=True,
            timeout=900,
        )

    def killed(self, *args: str, at: str, fork: bool = True) -> None:
        result = self.cli(*args, kill_at=at, fork=fork)
        assert result.returncode == -9, f"not killed at {at}: {result.stderr[-2000:]}"
        assert wait_until(lambda: marked_processes(self.mark) == [], 60), (
            f"processes left after the kill at {at}: {marked_processes(self.mark)}"
        )

    def versions(self) -> dict[str, dict]:
        return {str(v.version): v.tags for v in self.client.search_model_versions(f"name='{NAME}'")}

    def aliases(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.client.get_registered_model(NAME).aliases.items()}

    def assert_production_sound(self) -> None:
        """production holds a version with a complete, passing gate record; history ends on it."""
        holder = self.aliases()["production"]
        record = gate_record(self.client.get_model_version(NAME, holder))
        assert record and all(g.passed for g in record), f"v{holder}: {record}"
        assert production_history(self.client, NAME)[-1] == holder
        tag = self.client.get_registered_model(NAME).tags[HISTORY_TAG].split(",")
        assert tag[-1] == holder


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, make_tiny_config, cli, prefect_api):
    from tasks.common.tracking import Tracking

    tmp = tmp_path_factory.mktemp("kills")
    config = make_tiny_config(
        tmp,
        [
            "train.epochs=1",
            "train.checkpoint_steps=3",
            "serve.served_model_check=true",
            "serve.golden_requests=8",
            "quantize.variants=[dynamic_per_channel]",
            "registry.tolerance=1",  # a forced retrain of the same model must promote
        ],
    )
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return Pipeline(tmp, path, Tracking.connect(config.tracking).client, cli, prefect_api)


def _registry_after(point: str, p: Pipeline) -> None:
    """What the registry holds right after the kill at `point`."""
    stage_points = [c for c in CHAIN if c.startswith("before:")]
    if point in stage_points:
        assert p.client.search_registered_models() == []
    elif point in ("register:after-version", "register:serving"):
        [(number, tags)] = p.versions().items()
        assert tags["registration"] == "pending" and "gates.record" not in tags
        assert p.aliases() == {}
    elif point == "register:after-decision":
        [(number, tags)] = p.versions().items()
        assert tags["registration"] == "decided" and tags["promoted"] == "true"
        assert p.aliases() == {}
    elif point == "register:after-challenger":
        assert list(p.aliases()) == ["challenger"]
    elif point == "registry:after-alias":
        number = p.aliases()["production"]
        assert HISTORY_TAG not in p.client.get_registered_model(NAME).tags  # not yet written
        assert production_history(p.client, NAME) == [number]  # read back as it must be


def test_a_pipeline_killed_anywhere_resumes_and_registers_once(pipeline):
    p = pipeline
    for point in CHAIN:
        p.killed("run", at=point, fork=point != CHAIN[0])  # the first: `python -m flows.cli`
        _registry_after(point, p)
        if point == "register:after-version":
            [number] = p.versions()
            refused = p.cli("promote", "--model", NAME, "--version", number, "--force")
            assert refused.returncode == 2 and "Traceback" not in refused.stderr
            assert f"error: {NAME} v{number} has no complete gate record" in refused.stderr
    done = p.cli("run")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout[done.stdout.index("{") :])
    assert result["status"] == "completed" and result["promoted"]
    [number] = p.versions()  # the interrupted attempts' versions are gone, none doubled
    assert result["version"] == number and p.versions()[number]["registration"] == "complete"
    assert p.aliases() == {"challenger": number, "production": number}
    p.assert_production_sound()
    run = p.client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert len(p.client.search_runs([run.info.experiment_id])) == 1  # one run throughout
    steps = [m.step for m in p.client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(set(steps)) == steps  # each logged step once
    assert marked_processes(p.mark) == []


def test_promote_and_rollback_stay_consistent_when_killed(pipeline):
    p = pipeline
    first = p.aliases()["production"]
    back = p.cli("rollback", "--model", NAME)
    assert back.returncode == 2
    assert f"no earlier production version recorded before v{first}" in back.stderr

    p.killed("run", "--force", at="registry:after-alias")  # a new version holds production
    second = p.aliases()["production"]
    assert second != first and production_history(p.client, NAME) == [first, second]
    moved = p.cli("rollback", "--model", NAME)
    assert moved.returncode == 0, moved.stderr[-2000:]
    assert p.aliases()["production"] == first
    p.assert_production_sound()

    resumed = p.cli("run")  # finishes the forced run's version, but never undoes the rollback
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result = json.loads(resumed.stdout[resumed.stdout.index("{") :])
    assert result["version"] == second and not result["promoted"]
    assert "rolled back" in result["reason"]
    assert p.aliases() == {"challenger": second, "production": first}

    assert p.cli("promote", "--model", NAME, "--version", second).returncode == 0
    p.killed("rollback", "--model", NAME, at="registry:after-history")
    assert production_history(p.client, NAME) == [first, second]  # nothing lost
    again = p.cli("rollback", "--model", NAME)
    assert again.returncode == 0, again.stderr[-2000:]
    assert p.aliases()["production"] == first and production_history(p.client, NAME) == [first]
    p.assert_production_sound()
    assert sorted(p.versions()) == sorted([first, second])
    time.sleep(0.5)
    assert marked_processes(p.mark) == []
