"""Scaling out on this machine: DDP ranks against one process, and what launching them costs.

Runs the real train stage (tasks.stages.train_lora) on the packaged MiniLM and the demo data
(configs/default.yaml), every variant on the same prepared data, in one run:

  none-2t   one process, 2 torch threads (the default on this 2-core machine)
  ddp-1x2   torchrun, 1 rank x 2 threads
  ddp-2x1   torchrun, 2 ranks x 1 thread (gloo), the same global batch

each for --steps steps, order repeated --repeats times (A B C C B A ...). Printed per variant:
median train/tokens_per_second (all ranks together: tokens of the global batch per second of
training) and median train/time_to_first_step_s (stage start to the first step: loading,
and for torchrun the launch and rendezvous). Then the figures:

  scaling efficiency  = tokens/s(ddp-2x1) / tokens/s(none-2t)   (1.0: two ranks as fast as
                        one process with both cores; there is nothing more to gain on 2 cores)
  launch overhead     = time_to_first_step(ddp-N) - time_to_first_step(none-2t), for N = 1, 2,
                        as a share of one full default demo training stage (time/train_lora of
                        configs/default.yaml in-process, measured here once; --no-full skips it
                        and uses --steps steps instead)

Usage: .venv/bin/python benchmarks/distributed.py [--steps 30] [--repeats 2] [--no-full]
GPU figures (DDP/FSDP step time and peak memory per rank) need a CUDA machine and are not
measured here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.common.config import load_config  # noqa: E402
from tasks.common.tracking import Tracking, start_pipeline_run  # noqa: E402
from tasks.stages import prepare_data, train_lora  # noqa: E402

VARIANTS = {
    "none-2t": ["train.distributed.strategy=none"],
    "ddp-1x2": ["train.distributed.strategy=ddp", "train.distributed.nproc_per_node=1"],
    "ddp-2x1": ["train.distributed.strategy=ddp", "train.distributed.nproc_per_node=2"],
}


def base_overrides(work: Path) -> list[str]:
    return [
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        f"tracking.artifact_location={(work / 'artifacts').as_uri()}",
        f"output_dir={work / 'outputs'}",
        "train.checkpoint_steps=0",
        "data.split.validation=0",  # no per-epoch evaluation: training time only
    ]


def train_once(work: Path, overrides: list[str], data) -> dict[str, float]:
    config = load_config(str(ROOT / "configs" / "default.yaml"), overrides)
    run_id = start_pipeline_run(config)
    train_lora(config, data, run_id)
    return Tracking.connect(config.tracking).client.get_run(run_id).data.metrics


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-full", action="store_true", help="skip the full default stage")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    base = base_overrides(work)
    config = load_config(str(ROOT / "configs" / "default.yaml"), base)
    data = prepare_data(config, start_pipeline_run(config))
    steps = [f"train.max_steps={args.steps}"]
    figures: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for repeat in range(args.repeats):
        order = list(VARIANTS) if repeat % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            figures[name].append(train_once(work, [*base, *steps, *VARIANTS[name]], data))
    if args.no_full:
        full = statistics.median(m["time/train_lora"] for m in figures["none-2t"])
        full_label = f"{args.steps}-step stage"
    else:
        full = train_once(work, [*base, *VARIANTS["none-2t"]], data)["time/train_lora"]
        full_label = "full default demo training stage"

    def median(name: str, key: str) -> float:
        return statistics.median(m[key] for m in figures[name])

    print(f"{'variant':10} {'tokens/s':>10} {'first step (s)':>15} {'stage (s)':>10}")
    for name in VARIANTS:
        print(
            f"{name:10} {median(name, 'train/tokens_per_second'):10.0f} "
            f"{median(name, 'train/time_to_first_step_s'):15.2f} "
            f"{median(name, 'time/train_lora'):10.1f}"
        )
    efficiency = median("ddp-2x1", "train/tokens_per_second") / median(
        "none-2t", "train/tokens_per_second"
    )
    print(f"scaling efficiency ddp-2x1 / none-2t: {efficiency:.2f}")
    start = median("none-2t", "train/time_to_first_step_s")
    print(f"{full_label}: {full:.1f} s")
    for name in ("ddp-1x2", "ddp-2x1"):
        overhead = median(name, "train/time_to_first_step_s") - start
        print(
            f"launch overhead {name}: {overhead:.2f} s = {overhead / full:.1%} of the {full_label}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
