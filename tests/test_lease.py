"""Leases on pipeline runs: atomic claims, heartbeats, release, and who may take a run over."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tasks.common.lease import (
    HEARTBEAT_TAG,
    Holder,
    Lease,
    RunInProgress,
    holder_of,
    lease_alive,
)
from tasks.common.watchdog import start_time


@pytest.fixture
def client(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture
def run_id(client, tmp_path):
    experiment = client.create_experiment("leases", artifact_location=tmp_path.as_uri())
    return client.create_run(experiment).info.run_id


def test_only_one_process_wins_a_claim_number(client, run_id):
    first, second = Lease(client, run_id, 60), Lease(client, run_id, 60)
    second.holder = Holder("elsewhere", 1, "1")  # another process
    assert first.claim(0) is True
    assert second.claim(0) is False  # the param is taken: no second holder
    assert second.claim(1) is True  # a later number is a takeover (only when dead)
    assert holder_of(client.get_run(run_id)) == second.holder
    first.release(), second.release()


def test_a_held_lease_is_alive_until_released(client, run_id):
    lease = Lease(client, run_id, 60)
    assert not lease_alive(client.get_run(run_id), 60)  # unclaimed
    lease.claim(0)
    assert lease_alive(client.get_run(run_id), 60)
    lease.release()
    run = client.get_run(run_id)
    assert run.data.tags[HEARTBEAT_TAG] == f"{lease.holder} released"
    assert not lease_alive(run, 60)


def test_a_dead_holder_on_this_host_frees_the_lease_at_once(client, run_id):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    gone = Holder(socket.gethostname(), child.pid, start_time(child.pid) or "0")
    client.log_param(run_id, "lease.0", str(gone))
    client.set_tag(run_id, HEARTBEAT_TAG, f"{gone} {time.time():.3f}")  # a fresh heartbeat...
    assert not lease_alive(client.get_run(run_id), 60)  # ...but the process is gone


def test_a_holder_elsewhere_is_alive_while_its_heartbeat_is_fresh(client, run_id):
    remote = Holder("another-host", 4242, "777")
    client.log_param(run_id, "lease.0", str(remote))
    client.set_tag(run_id, HEARTBEAT_TAG, f"{remote} {time.time() - 10:.3f}")
    run = client.get_run(run_id)
    assert lease_alive(run, ttl_s=60)
    assert not lease_alive(run, ttl_s=5)  # 10 s without a beat: past this TTL
    client.set_tag(run_id, HEARTBEAT_TAG, f"{remote} released")
    assert not lease_alive(client.get_run(run_id), ttl_s=60)


def test_the_heartbeat_advances_and_notices_a_takeover(client, run_id):
    lease = Lease(client, run_id, ttl_s=0.4)  # beats every 0.1 s
    lease.claim(0)
    first = client.get_run(run_id).data.tags[HEARTBEAT_TAG]
    time.sleep(0.5)
    assert client.get_run(run_id).data.tags[HEARTBEAT_TAG] != first
    client.log_param(run_id, "lease.1", str(Holder("thief", 1, "1")))
    assert lease.lost.wait(timeout=10)
    with pytest.raises(RunInProgress, match=rf"^run {run_id} was taken over by another process"):
        lease.check()
    lease.release()
    assert client.get_run(run_id).data.tags[HEARTBEAT_TAG].startswith("thief") is False
