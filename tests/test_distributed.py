"""Training on several ranks with torchrun (gloo on this CPU) trains as one process does.

DDP with 2 ranks x 1 thread against one process, same global batch and data order, dropout 0:
the same losses and adapter. Then the faults: a node that never joins, a rank killed with and
without restarts, and two launchers meeting as two nodes. The causal_lm case is in
tests/test_causal_distributed.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tasks.common.distributed import failure
from tasks.common.errors import ConfigError, ModelError, TrainingError
from tasks.common.faults import KILL_AT_ENV
from tasks.common.processes import start_group
from tasks.common.tracking import Tracking, start_pipeline_run
from tasks.stages import prepare_data, train_lora
from testkit.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
STEPS = [
    "train.max_steps=6",
    "train.logging_steps=1",
    "train.batch_size=8",
    "train.checkpoint_steps=0",
    "data.split.validation=0",
    "lora.dropout=0.0",
    # fp32: the proofs compare topologies to 1e-4; under bf16 autocast (precision auto on an
    # AMX CPU) another per-rank batch shape rounds differently (3e-4 on the loss)
    "train.precision=fp32",
]


def ddp(nproc: int = 2, *more: str) -> list[str]:
    """Overrides for DDP on this machine, with a rendezvous port of its own."""
    return [
        "train.distributed.strategy=ddp",
        f"train.distributed.nproc_per_node={nproc}",
        f"train.distributed.rdzv_endpoint=127.0.0.1:{free_port()}",
        *more,
    ]


@pytest.fixture(scope="session")
def still_bert(tmp_path_factory, tiny_bert) -> Path:
    """The tiny BERT without dropout: every rank computes what one process computes."""
    folder = tmp_path_factory.mktemp("still-bert") / "model"
    shutil.copytree(tiny_bert, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def losses(config, run_id: str) -> dict[int, float]:
    """The last logged loss per step (a restarted group logs some steps twice)."""
    history = Tracking.connect(config.tracking).client.get_metric_history(run_id, "train/loss")
    return {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}


def adapter_weights(trained) -> dict:
    return load_file(str(Path(trained.adapter.local_path) / "adapter_model.safetensors"))


def assert_same_training(config, reference, trained, run_id, other, other_run_id) -> None:
    expected, got = losses(config, reference), losses(other, other_run_id)
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-4), step
    ours, theirs = adapter_weights(trained[0]), adapter_weights(trained[1])
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert (ours[name] - theirs[name]).abs().max() <= 1e-5, name


@pytest.fixture(scope="module")
def single(tmp_path_factory, make_tiny_config, still_bert):
    """One process: the reference every distributed run must equal."""
    tmp = tmp_path_factory.mktemp("single")
    config = make_tiny_config(tmp, [*STEPS, f"model.name_or_path={still_bert}", "output.keep=true"])
    run_id = start_pipeline_run(config)
    data = prepare_data(config, run_id)
    return config, run_id, data, train_lora(config, data, run_id)


def test_ddp_on_two_ranks_equals_one_process(single, make_tiny_config, still_bert, tmp_path):
    config, run_id, data, trained = single
    ddp_config = make_tiny_config(
        tmp_path, [*STEPS, f"model.name_or_path={still_bert}", "output.keep=true", *ddp()]
    )
    ddp_run = start_pipeline_run(ddp_config)
    ddp_data = prepare_data(ddp_config, ddp_run)
    ddp_trained = train_lora(ddp_config, ddp_data, ddp_run)
    assert ddp_trained.global_steps == trained.global_steps == 6
    assert_same_training(config, run_id, (trained, ddp_trained), run_id, ddp_config, ddp_run)
    client = Tracking.connect(ddp_config.tracking).client
    run = client.get_run(ddp_run)
    assert len(client.get_metric_history(ddp_run, "train/loss")) == 6  # one series, rank 0's
    metrics = run.data.metrics
    assert metrics["train/world_size"] == 2
    assert metrics["train/time_to_first_step_s"] > 0
    assert metrics["train/replica_divergence"] == 0.0  # both ranks hold the same weights
    for rank in (0, 1):
        assert metrics[f"train/rank{rank}/tokens_per_second"] > 0
        assert metrics[f"train/rank{rank}/peak_memory_mb"] > 0
    assert run.data.tags["train.strategy"] == "ddp"
    assert len(client.search_runs([run.info.experiment_id])) == 1  # no run per rank


def test_a_world_size_that_does_not_divide_the_batch_is_a_config_error(make_tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="use train.batch_size 9 or 12"):
        make_tiny_config(tmp_path, ["train.batch_size=10", *ddp(3)])


@pytest.mark.parametrize("endpoint", ["nohost", "host:0", "host:70000", "a b:29400", ":29400"])
def test_a_bad_rendezvous_endpoint_is_a_config_error(endpoint, make_tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="must be host:port with a port of 1-65535"):
        make_tiny_config(tmp_path, [f"train.distributed.rdzv_endpoint={endpoint}"])
    make_tiny_config(tmp_path, ['train.distributed.rdzv_endpoint="[::1]:29400"'])  # IPv6: fine


def test_fsdp_without_cuda_is_refused_before_any_rank_starts(single, make_tiny_config, tmp_path):
    _, _, data, _ = single
    config = make_tiny_config(tmp_path, [*STEPS, *ddp(2)[1:], "train.distributed.strategy=fsdp"])
    with pytest.raises(ConfigError, match="fsdp needs CUDA GPUs"):
        train_lora(config, data, start_pipeline_run(config))


@pytest.mark.parametrize(
    ("outcome", "error", "message"),
    [
        (
            {"cause": "rank", "message": "TrainingError: training loss became nan at step 3"},
            TrainingError,
            r"^rank 1 \(local rank 0 on gpu-7\): training loss became nan at step 3$",
        ),
        (
            {"cause": "rank", "message": "ModelError: cannot load the base model"},
            ModelError,
            r"^rank 1 .*: cannot load the base model$",
        ),
        (
            {"cause": "rank", "exitcode": 1, "message": "RuntimeError: CUDA out of memory"},
            TrainingError,
            r"exited with code 1: RuntimeError: CUDA out of memory; the group was stopped",
        ),
        (
            {"cause": "rank", "exitcode": -9, "signal": "SIGKILL", "message": ""},
            TrainingError,
            r"was killed by SIGKILL; .*out-of-memory killer",
        ),
        (
            {
                "cause": "rank",
                "exitcode": -6,
                "signal": "SIGABRT",
                "message": "",
                "output": "terminate called after throwing 'gloo::IoException'",
            },
            TrainingError,
            r"killed by SIGABRT \(its last output:\nterminate called after throwing "
            r"'gloo::IoException'\n\); the group was stopped",
        ),
        (
            {"cause": "rank", "exitcode": 1, "message": "RuntimeError: boom", "output": "noise"},
            TrainingError,
            r"exited with code 1: RuntimeError: boom; the group",  # its own message, not noise
        ),
    ],
)
def test_a_failed_rank_becomes_an_error_naming_it(outcome, error, message, tiny_config):
    """A rank's own PipelineError keeps its class (a bad input stays exit code 2); anything
    else is a TrainingError with the rank, its host and how it ended."""
    where = {"ok": False, "rank": 1, "local_rank": 0, "host": "gpu-7", "exitcode": 1}
    got = failure(tiny_config, {**where, "signal": None, **outcome}, 1, Path("logs"))
    assert type(got) is error
    assert re.search(message, str(got)), str(got)


def test_a_node_that_never_joins_fails_after_the_join_timeout(single, make_tiny_config, tmp_path):
    config, _, data, _ = single
    lonely = make_tiny_config(
        tmp_path,
        [*STEPS, "train.batch_size=8", *ddp(1, "train.distributed.nnodes=2")]
        + ["train.distributed.join_timeout_s=3"],
    )
    with pytest.raises(TrainingError, match=r"rendezvous: 1 of 2 nodes joined in \d+ s"):
        train_lora(lonely, data, start_pipeline_run(lonely))


@pytest.fixture
def rendezvous_store():
    """tasks/common/rendezvous_store.py on a free port, as deploy/kubernetes runs it."""
    port = free_port()
    group = start_group(
        [sys.executable, "-m", "tasks.common.rendezvous_store", "--host", "127.0.0.1",
         "--port", str(port)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert group.process.stdout.readline().startswith("rendezvous store on")
    yield f"127.0.0.1:{port}"
    group.stop()


def test_two_launchers_train_as_two_nodes(
    single, make_tiny_config, still_bert, tmp_path, rendezvous_store
):
    """Two nodes (one rank each) meet in a stand-alone store, as Kubernetes pods do: each
    launcher connects to it as a client."""
    config, run_id, data, trained = single
    endpoint = rendezvous_store
    shared = tmp_path / "checkpoints"  # a shared folder, as on a cluster
    nodes = [
        make_tiny_config(
            tmp_path,
            [*STEPS, f"model.name_or_path={still_bert}", "output.keep=true", *ddp(1)]
            + ["train.distributed.nnodes=2", f"train.distributed.rdzv_endpoint={endpoint}"]
            + [f"output_dir={tmp_path / f'node{n}'}", f"train.checkpoint_dir={shared}"],
        )
        for n in (0, 1)
    ]
    both = start_pipeline_run(nodes[0])
    results: dict[int, object] = {}

    def node(n: int) -> None:
        try:
            results[n] = train_lora(nodes[n], data, both)
        except Exception as exc:  # noqa: BLE001  (the assertion below shows it)
            results[n] = exc

    threads = [threading.Thread(target=node, args=(n,)) for n in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(not isinstance(r, Exception) for r in results.values()), results
    assert results[0].global_steps == results[1].global_steps == 6
    assert {Path(r.adapter.local_path).parent.parent.name for r in results.values()} == {
        "node0",
        "node1",
    }  # each node's launcher names its own folder (rank 0's node wrote it)
    for n in (0, 1):
        Tracking.connect(nodes[n].tracking).run(both).fetch(results[n].adapter)
    assert_same_training(config, run_id, (trained, results[0]), run_id, nodes[0], both)


@pytest.mark.parametrize("restarts", [1, 0])
def test_a_killed_rank(restarts, single, make_tiny_config, still_bert, tmp_path, monkeypatch):
    """SIGKILL of rank 1 at step 4: with a restart the group resumes from checkpoint-2 and
    ends as an uninterrupted run; without, the stage fails naming the rank, and a re-run
    resumes."""
    config, run_id, data, trained = single
    faulty = make_tiny_config(
        tmp_path,
        [*STEPS, f"model.name_or_path={still_bert}", "output.keep=true", *ddp()]
        + ["train.checkpoint_steps=2", f"train.distributed.max_restarts={restarts}"],
    )
    run = start_pipeline_run(faulty)
    monkeypatch.setenv(KILL_AT_ENV, "rank1:step4")
    if restarts:
        again = train_lora(faulty, data, run)
    else:
        # rank 1's output went to its log file: the error ends with its last line
        with pytest.raises(
            TrainingError,
            match=r"rank 1 \(local rank 1 on .*\) was killed by SIGKILL \(its last output:"
            r"\n(.*\n)*fault point rank1:step4: SIGKILL\n\); the group was stopped",
        ):
            train_lora(faulty, data, run)
        monkeypatch.delenv(KILL_AT_ENV)
        again = train_lora(faulty, data, run)
    client = Tracking.connect(faulty.tracking).client
    assert client.get_run(run).data.tags["train.resumed_from"] == "checkpoint-2"
    assert_same_training(config, run_id, (trained, again), run_id, faulty, run)


def test_fsdp_shards_gather_into_the_adapter_one_process_trains(tmp_path):
    """FSDP2 (torch's fully_shard, gloo: accelerate's FSDP refuses CPU, so the Trainer is left
    out) on 2 ranks: one step, the adapter gathered from the shards equals one process's on
    the same global batch, and loads in peft."""
    peft = pytest.importorskip("peft")
    from transformers import BertForSequenceClassification

    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
         "-m", "testkit.fsdp_adapter", str(tmp_path)],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    sharded = load_file(str(tmp_path / "fsdp" / "adapter_model.safetensors"))
    single = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    assert sharded.keys() == single.keys() and any("classifier" in k for k in sharded)
    for name in sharded:
        assert (sharded[name] - single[name]).abs().max() <= 1e-6, name
    ids = torch.arange(5, 17).reshape(1, 12)
    logits = []
    for folder in ("fsdp", "single"):
        base = BertForSequenceClassification.from_pretrained(str(tmp_path / "base"))
        model = peft.PeftModel.from_pretrained(base, str(tmp_path / folder)).eval()
        logits.append(model(input_ids=ids).logits)
    assert torch.allclose(logits[0], logits[1], atol=1e-6)


def test_a_ranks_error_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """The agent reads every failed rank's error file while it stops the others: the file
    appears complete in one rename, never half written."""
    from tasks.common.elastic import AtomicErrorHandler, record

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    opened = []
    real_open = open

    def watching_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", watching_open)

    @record
    def rank():
        raise ValueError("rank 1 ran out of patience")

    with pytest.raises(ValueError):
        rank()
    assert str(error_file) not in opened  # written elsewhere, then renamed into place
    data = json.loads(error_file.read_text())
    assert data["message"]["message"] == "ValueError: rank 1 ran out of patience"
    assert list(tmp_path.iterdir()) == [error_file]
    assert AtomicErrorHandler().partial is None


def test_a_failed_ranks_outcome_carries_the_end_of_its_stderr(tmp_path):
    """torchrun writes a redirected rank's stderr to <log dir>/<run>/attempt_<k>/<local
    rank>/: the outcome keeps the last attempt's last non-blank lines (at most OUTPUT_LINES);
    none where there is no file (local rank 0 prints on the console)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from tasks.common.elastic import OUTPUT_LINES, rank_outcome

    lines = [f"line {k}" for k in range(40)] + ["", "Fatal Python error: Aborted", ""]
    for attempt, text in (("attempt_1", "\n".join(lines)), ("attempt_0", "the first attempt")):
        (tmp_path / "run_x" / attempt / "1").mkdir(parents=True)
        (tmp_path / "run_x" / attempt / "1" / "stderr.log").write_text(text)
    killed = ProcessFailure(1, 101, -6, str(tmp_path / "no-error-file.json"))
    outcome = rank_outcome(ChildFailedError("rank", {3: killed}), str(tmp_path))
    assert (outcome["rank"], outcome["local_rank"], outcome["signal"]) == (3, 1, "SIGABRT")
    assert outcome["message"] == ""  # not torch's made-up "Signal 6 (SIGABRT) received by PID"
    assert outcome["output"].splitlines() == [*lines[40 - OUTPUT_LINES + 1 : 40], lines[41]]
    console = ProcessFailure(0, 100, -6, str(tmp_path / "no-error-file.json"))
    assert rank_outcome(ChildFailedError("rank", {0: console}), str(tmp_path))["output"] == ""


def test_torchrun_sends_the_other_local_ranks_output_to_files(make_tiny_config, tmp_path):
    """Local rank 0 prints on the console; ranks 1.. write stdout and stderr to the log folder
    (torchrun's filter alone would drop their output); one rank: nothing redirected."""
    from tasks.common.distributed import torchrun_arguments

    for nproc, redirects in ((3, "--redirects=1:3,2:3"), (1, "--redirects=0")):
        config = make_tiny_config(tmp_path, [*ddp(nproc), "train.batch_size=6"])
        args = torchrun_arguments(config, "run", "m", tmp_path / "spec", tmp_path / "logs")
        assert redirects in args and "--local-ranks-filter=0" in args


def test_the_failure_reported_is_the_rank_that_caused_the_others(tmp_path):
    """When rank 1 is SIGKILLed, rank 0 fails on the broken connection and the agent stops it;
    rank 0's error file is stamped before the agent notices rank 1 (whole seconds), so torch's
    earliest-timestamp rule named rank 0. The root cause is rank 1; a rank's own error comes
    before a peer's lost connection, and ranks the agent stopped come last."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from tasks.common.elastic import root_cause

    def failed(local_rank, exitcode, message=None, stamped=0):
        error_file = tmp_path / f"error-{local_rank}-{exitcode}.json"
        if message is not None:
            info = {"py_callstack": "", "timestamp": str(stamped)}
            error_file.write_text(json.dumps({"message": {"message": message, "extraInfo": info}}))
        return ProcessFailure(local_rank, 100 + local_rank, exitcode, str(error_file))

    lost = "RuntimeError: [gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer"
    killed = {1: failed(1, -9), 0: failed(0, -15, lost, stamped=1)}
    assert min(killed, key=lambda r: killed[r].timestamp) == 0  # torch's rule: the wrong rank
    assert root_cause(killed) == 1
    own = {0: failed(0, 1, "TrainingError: loss is nan", stamped=5), 1: failed(1, 1, lost, 2)}
    assert root_cause(own) == 0
    stopped = {0: failed(0, -15, "SignalException: 15", 7), 1: failed(1, 1, lost, stamped=8)}
    assert root_cause(stopped) == 1
    everyone = {1: failed(1, -15, "SignalException: 15", 4), 0: failed(0, -15, "x: y", 4)}
    assert root_cause(everyone) == 0
