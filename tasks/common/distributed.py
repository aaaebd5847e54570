"""Launching a train stage's ranks with torchrun, and what to tell the user when they fail.

One launcher per node (the train stage on that node) starts torchrun (tasks/common/elastic.py)
as a process group of its own that dies with the launcher (tasks/common/processes.py): torch's
elastic agent then starts `nproc_per_node` ranks, meets the other nodes through the c10d
rendezvous, restarts the whole group up to `max_restarts` times after a failure (the ranks
resume from the last complete checkpoint) and ends every rank when it is stopped. Each rank
registers a watchdog on the agent, so no rank outlives it even when the agent is SIGKILLed;
under a Prefect worker a second watchdog ends the group when the worker goes.

The launcher hands the ranks a spec (a JSON file: config, run id, folders) and reads back the
outcome torchrun's wrapper writes; it never parses logs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from tasks.common import errors
from tasks.common.config import DistributedConfig, PipelineConfig, check_global_batch
from tasks.common.elastic import BACKEND
from tasks.common.errors import ConfigError, PipelineError, TrainingError
from tasks.common.processes import start_group, watch
from tasks.common.training import FSDP_NEEDS_CUDA, RUN_ID_ENV

ELASTIC_MODULE = "tasks.common.elastic"
WORKER_ENV = "PREFECT__FLOW_RUN_ID"  # set in the flow-run processes Prefect workers start


def nproc_per_node(dist: DistributedConfig) -> int:
    """The config's value; auto: one per visible CUDA device (one process without GPUs)."""
    if dist.nproc_per_node != "auto":
        return dist.nproc_per_node
    return max(1, torch.cuda.device_count())


def is_distributed(config: PipelineConfig) -> bool:
    return config.train.distributed.strategy != "none"


def torchrun_arguments(
    config: PipelineConfig, run_id: str, entry_module: str, spec: Path, log_dir: Path
) -> list[str]:
    """torchrun's command line: c10d rendezvous, restarts, local rank 0's output on the
    console (the other local ranks' stdout and stderr go to files in log_dir, where a failure
    report reads their last lines), then `-m entry_module spec`."""
    dist = config.train.distributed
    nproc = nproc_per_node(dist)
    to_files = ",".join(f"{local_rank}:3" for local_rank in range(1, nproc)) or "0"
    check_global_batch(config.train, dist.nnodes * nproc)
    if dist.strategy == "fsdp" and not torch.cuda.is_available():
        raise ConfigError(FSDP_NEEDS_CUDA)  # before any rank starts; ranks check it again
    return [
        f"--nnodes={dist.nnodes}",
        f"--nproc-per-node={nproc}",
        f"--rdzv-backend={BACKEND}",
        f"--rdzv-endpoint={dist.rdzv_endpoint}",
        f"--rdzv-id={dist.rdzv_id or run_id}",
        f"--rdzv-conf=join_timeout={dist.join_timeout_s}",
        f"--max-restarts={dist.max_restarts}",
        f"--log-dir={log_dir}",
        f"--redirects={to_files}",
        "--local-ranks-filter=0",
        "--module",
        entry_module,
        str(spec),
    ]


def launch(config: PipelineConfig, run_id: str, entry_module: str, folder: Path, spec: dict):
    """Run `entry_module` on every rank of this node with torchrun; raise when the group fails.

    `spec` (JSON values) is what each rank reads from the file named in its command line.
    """
    folder.mkdir(parents=True, exist_ok=True)
    spec_file, outcome_file = folder / "spec.json", folder / "outcome.json"
    spec_file.write_text(json.dumps(spec))
    outcome_file.unlink(missing_ok=True)
    args = torchrun_arguments(config, run_id, entry_module, spec_file, folder / "ranks")
    command = [sys.executable, "-m", ELASTIC_MODULE, str(outcome_file), "--", *args]
    env = {**os.environ, RUN_ID_ENV: run_id, "PYTHONPATH": _python_path()}
    env.setdefault("OMP_NUM_THREADS", str(threads_per_rank(config)))
    # Ranks of a restarted group must not share the rendezvous store: they would read the
    # previous attempt's addresses and hang in init_process_group (pytorch/pytorch#135712).
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # A rank that aborts or crashes in native code (gloo, a kernel) prints its Python stacks.
    env.setdefault("PYTHONFAULTHANDLER", "1")
    grace = config.train.distributed.grace_s
    group = start_group(command, grace_s=grace, env=env)
    # A flow run of a Prefect worker can outlive a stopped worker: its ranks must not.
    worker = watch([f"g{group.pgid}"], grace, parent=os.getppid()) if WORKER_ENV in env else None
    try:
        group.process.wait()
    finally:
        group.stop()  # whatever ended this wait, no process of the group survives it
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=5)
    outcome = json.loads(outcome_file.read_text()) if outcome_file.is_file() else None
    if outcome is None or not outcome["ok"]:
        raise failure(config, outcome, group.process.returncode, folder / "ranks")


def threads_per_rank(config: PipelineConfig) -> int:
    """This node's cores shared by its ranks (torchrun would give each rank 1 thread)."""
    return max(1, (os.cpu_count() or 1) // nproc_per_node(config.train.distributed))


def _python_path() -> str:
    """This checkout first, so that every rank imports the pipeline's modules as this does."""
    root = str(Path(__file__).resolve().parents[2])
    rest = os.environ.get("PYTHONPATH")
    return root + (os.pathsep + rest if rest else "")


def failure(config: PipelineConfig, outcome: dict | None, code: int | None, logs: Path):
    """The error a failed group becomes: the rank's own PipelineError class when it raised
    one (a bad config stays exit 2), else a TrainingError naming the rank and its end."""
    dist = config.train.distributed
    if outcome is None:
        return TrainingError(f"torchrun ended with exit code {code} before any rank ran")
    if outcome["cause"] == "rendezvous":
        return TrainingError(
            f"rendezvous: {outcome['joined']} of {outcome['nnodes']} nodes joined in "
            f"{outcome['seconds']} s at {dist.rdzv_endpoint}: start a launcher on every node "
            f"(nnodes {dist.nnodes}), check that they reach the endpoint, or raise "
            f"train.distributed.join_timeout_s"
        )
    where = f"rank {outcome['rank']} (local rank {outcome['local_rank']} on {outcome['host']})"
    name, _, text = (outcome["message"] or "").partition(": ")
    kind = getattr(errors, name, None)
    if isinstance(kind, type) and issubclass(kind, PipelineError) and text:
        return kind(f"{where}: {text}")
    how = (
        f"was killed by {outcome['signal']}"
        if outcome["signal"]
        else f"exited with code {outcome['exitcode']}"
    )
    if outcome["message"]:  # its own message says more than its output
        said = f": {outcome['message']}"
    elif outcome.get("output"):
        said = f" (its last output:\n{outcome['output']}\n)"
    else:
        said = ""
    restarts = (
        f" after {dist.max_restarts} restart(s)"
        if dist.max_restarts
        else " (train.distributed.max_restarts 0)"
    )
    return TrainingError(
        f"{where} {how}{said}; the group was stopped{restarts}. A SIGKILL is often the "
        f"out-of-memory killer: lower train.batch_size or raise gradient_accumulation_steps. "
        f"Re-running the same run resumes from its last complete checkpoint; rank logs: {logs}"
    )
