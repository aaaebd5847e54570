"""The train stage's work: one process, or every rank of a torchrun group.

`train_adapter` trains here (train.distributed.strategy none) or launches this node's ranks
(tasks/common/distributed.py), each running `python -m tasks.train_adapter SPEC`. The node's
launcher fetches the prepared data once, before its ranks start; every rank builds the task
kind's setup and trains; rank 0 alone connects to MLflow: it logs the curves, the adapter and
`train/adapter.json`, which every node's launcher reads back once the group has finished.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from datasets import DatasetDict, load_from_disk
from transformers import TrainerCallback, set_seed
from transformers.utils import logging as hf_logging

from tasks.common.config import PipelineConfig, config_from_dict
from tasks.common.console import log_to_stderr
from tasks.common.distributed import is_distributed, launch
from tasks.common.elastic import record
from tasks.common.errors import TrainingError
from tasks.common.processes import watch
from tasks.common.stage import StageContext
from tasks.common.tracking import ArtifactRef, TrackedRun, Tracking
from tasks.common.training import fit
from tasks.kinds import kind_of
from tasks.records import PreparedData, TrainedAdapter

ADAPTER_RECORD = "train/adapter.json"  # how the adapter was trained, logged by rank 0
TRAINING_SPLITS = ("train", "validation")


def train_adapter(
    stage: StageContext, data: PreparedData, callbacks: Sequence[TrainerCallback] = ()
) -> TrainedAdapter:
    """Train LoRA (and any new head) on the training split; the adapter is logged to the run.
    `callbacks` (a search trial's pruner) join the Trainer when it trains in this process."""
    config, started = stage.config, time.time()
    data_dir = stage.fetch(data.dataset)  # once per node, before any rank starts
    adapter_dir = stage.stage_dir("adapter")
    if not is_distributed(config):
        return train_and_log(config, stage.run, data_dir, adapter_dir, started, callbacks=callbacks)
    if callbacks:
        raise TrainingError(
            "a search trial with train.distributed trains its ranks in other processes, which "
            "cannot report to the pruner: use search.pruner none with train.distributed"
        )
    spec = {
        "config": config.model_dump(mode="json"),
        "run_id": stage.run_id,
        "data_dir": str(data_dir),
        "adapter_dir": str(adapter_dir),
        "stage_started": started,
    }
    ranks = adapter_dir.parent / f"ranks-{os.getpid()}"  # one per launcher (node)
    launch(config, stage.run_id, __name__, ranks, spec)
    record_file = stage.run.client.download_artifacts(stage.run_id, ADAPTER_RECORD, str(ranks))
    logged = json.loads(Path(record_file).read_text())
    trained = adapter_from_record(logged, stage.run_id, adapter_dir)
    if not any(adapter_dir.iterdir()):  # rank 0 ran on another node: its adapter comes here
        adapter_dir.rmdir()
        stage.fetch(trained.adapter)
    return trained


def train_and_log(
    config: PipelineConfig,
    run: TrackedRun | None,
    data_dir: Path,
    adapter_dir: Path,
    stage_started: float,
    record: bool = False,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainedAdapter | None:
    """Train on this process; with a run (rank 0, or training alone) log the adapter folder,
    and with `record` its record for the launchers. None on the other ranks."""
    set_seed(config.train.seed)  # before the setup: LoRA and head init draw from it
    setup = kind_of(config).training_setup(config, data_dir)
    dataset = training_splits(data_dir / "tokenized")
    result = fit(config, run, setup, dataset, adapter_dir, stage_started, callbacks)
    if run is None:
        return None
    ref = run.log_folder(adapter_dir, "adapter")
    if record:
        logged = {**asdict(result), "adapter_artifact_path": ref.artifact_path}
        run.log_json(logged, ADAPTER_RECORD)
    return TrainedAdapter(adapter=ref, **asdict(result))


def training_splits(folder: Path) -> DatasetDict:
    """The train and validation splits of a saved DatasetDict: training never opens test."""
    names = json.loads((folder / "dataset_dict.json").read_text())["splits"]
    return DatasetDict(
        {name: load_from_disk(str(folder / name)) for name in TRAINING_SPLITS if name in names}
    )


def adapter_from_record(logged: dict, run_id: str, adapter_dir: Path) -> TrainedAdapter:
    """The TrainedAdapter rank 0 logged; its folder is adapter_dir on this node (fetched from
    the artifact store when rank 0 ran on another node)."""
    fields = {k: v for k, v in logged.items() if k != "adapter_artifact_path"}
    ref = ArtifactRef(
        run_id=run_id, artifact_path=logged["adapter_artifact_path"], local_path=str(adapter_dir)
    )
    return TrainedAdapter(adapter=ref, **fields)


@record  # a rank's exception reaches the launcher as its message (tasks/common/elastic.py)
def rank_main(spec_file: str) -> None:
    """One rank: train its share; rank 0 connects to MLflow and logs, the others stay quiet."""
    watch([f"g{os.getpid()}"], parent=os.getppid())  # the agent dies: so does this rank
    spec = json.loads(Path(spec_file).read_text())
    config = config_from_dict(spec["config"], source=spec_file)
    rank = int(os.environ["RANK"])
    run = Tracking.connect(config.tracking).run(spec["run_id"]) if rank == 0 else None
    if rank == 0:
        log_to_stderr()  # the step lines; torchrun shows local rank 0's output only
    else:
        hf_logging.set_verbosity_error()
    folders = Path(spec["data_dir"]), Path(spec["adapter_dir"])
    train_and_log(config, run, *folders, spec["stage_started"], record=True)


if __name__ == "__main__":
    rank_main(sys.argv[1])
