"""Int8 on a hard real corpus: long, noisy man-page texts in 5 classes, measured in one run.

The corpus: Debian's man pages (the `manpages`, `manpages-dev` and every installed package's
pages under --man-root), classed by section: 1 user commands, 2 system calls, 3 library
functions, 5 file formats, 8 administration commands. Each text is a window of a page's body
(NAME and SYNOPSIS left out) with roff markup stripped the quick way, so escapes, option tables
and code fragments stay in: about 10% of the windows are long (110-260 words), the rest 12-70
words. Without man pages here: `apt-get download manpages manpages-dev coreutils util-linux`
and `dpkg-deb -x <each .deb> DIR`, then --man-root DIR/usr/share/man (--fetch DIR does that).

The run trains the default pipeline's model on it (temporary MLflow store, data.max_length
256), exports (fused), quantizes (variants, then the sensitivity search), and prints side by
side: the unfused fp32 export, the fused fp32 graph and the served variant (accuracy, agreement
with fp32, batch-1 p50 on the same test texts, timed in alternation), the goal figures (served
variant int8 or mixed, accuracy drop <= 0.5 points, p50 <= 0.4 x fp32 ONNX) and every
candidate the quantize stage scored.

    .venv/bin/python benchmarks/hard_corpus.py [--per-class 300] [--runs 200] [--set K=V ...]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from flows.retrain import run_stages
from tasks.classification.data import load_split
from tasks.classification.modeling import session_feed, session_logits
from tasks.common.config import load_config
from tasks.common.latency import interleaved
from tasks.common.models import load_tokenizer
from tasks.common.onnx import (
    ONNX_FILE,
    SERVED_FILE,
    graph_op_types,
    max_abs_diff,
    open_session,
    optimum_export,
)
from tasks.common.stage import StageContext
from tasks.common.tracking import Tracking, start_pipeline_run

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {
    "1": "user_command",
    "2": "system_call",
    "3": "library_function",
    "5": "file_format",
    "8": "admin_command",
}
SKIPPED_SECTIONS = {"NAME", "SYNOPSIS"}
FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
INLINE_MACROS = re.compile(r"^\.(B|I|BR|RB|IR|RI|BI|IB|SM|SB|TP|IP|HP|PP|LP|P|TQ)\b\s*")
DEB_PACKAGES = ("manpages", "manpages-dev", "coreutils", "util-linux")


def page_text(raw: str) -> str:
    """A page's body as plain-ish text: macro lines dropped (inline-format ones kept as text),
    NAME and SYNOPSIS left out, font escapes and quotes removed, other escapes left (noise)."""
    words, section = [], ""
    for line in raw.splitlines():
        if line.startswith((".SH", ".Sh")):
            section = line[3:].strip().strip('"').upper()
            continue
        if section in SKIPPED_SECTIONS or line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith((".", "'")):
            if not INLINE_MACROS.match(line):
                continue
            line = INLINE_MACROS.sub("", line).replace('"', "")
        line = FONT.sub("", line).replace("\\-", "-").replace("\\&", "").replace("\\e", "\\")
        words.extend(line.split())
    return " ".join(words)


def window(words: list[str], rng: random.Random) -> str:
    """A random window of a page: long (110-260 words) 10% of the time, else 12-70 words."""
    size = rng.randint(110, 260) if rng.random() < 0.1 else rng.randint(12, 70)
    start = rng.randint(0, max(0, len(words) - size))
    return " ".join(words[start : start + size])


def build_corpus(man_root: Path, per_class: int, seed: int) -> pd.DataFrame:
    """per_class texts of each section (one window per page, pages drawn at random)."""
    rng, rows = random.Random(seed), []
    for number, label in SECTIONS.items():
        folder = man_root / f"man{number}"
        pages = sorted(folder.glob("*")) if folder.is_dir() else []
        if len(pages) < per_class // 2:
            raise SystemExit(
                f"error: {folder} has {len(pages)} pages (need about {per_class}): install man "
                f"pages (apt-get download {' '.join(DEB_PACKAGES)}; dpkg-deb -x each) and pass "
                f"--man-root, or use --fetch DIR"
            )
        rng.shuffle(pages)
        taken = 0
        for page in pages:
            if taken == per_class:
                break
            if page.is_symlink() or not page.is_file():
                continue
            opener = gzip.open if page.suffix == ".gz" else open
            with opener(page, "rt", errors="replace") as handle:
                words = page_text(handle.read()).split()
            if len(words) >= 12 and not words[0].startswith(".so"):
                rows.append({"text": window(words, rng), "label": label})
                taken += 1
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def fetch_man_pages(folder: Path) -> Path:
    """apt-get download the man-page packages into folder and unpack them; the man root."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", *DEB_PACKAGES], cwd=folder, check=True)
    for deb in sorted(folder.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(folder / "root")], check=True)
    return folder / "root" / "usr" / "share" / "man"


def alternating_p50(sessions: dict, singles: list, warmup: int, runs: int) -> dict[str, float]:
    """Batch-1 p50 (ms) of each session on the same single texts, the sessions taking turns in
    blocks of requests (tasks/common/latency.interleaved), so that every engine sees the same
    machine load (one request each in turn timed each against the others' spinning threads).
    Only session.run is timed: each session's feeds are made first."""

    def timed_run(session):
        feeds = [session_feed(session, batch) for batch in singles]
        return lambda k: session.run(["logits"], feeds[k % len(feeds)])

    runs_by_name = {name: timed_run(session) for name, session in sessions.items()}
    samples = interleaved(runs_by_name, runs, block=10, warmup=warmup)
    return {name: float(np.median(values)) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    parser.add_argument("--man-root", default="/usr/share/man")
    parser.add_argument("--fetch", help="apt-get download the man pages into this folder")
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--runs", type=int, default=200, help="timed batch-1 requests per graph")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    man_root = fetch_man_pages(Path(args.fetch)) if args.fetch else Path(args.man_root)
    store = Path(tempfile.mkdtemp(prefix="bench-hard-corpus-"))
    frame = build_corpus(man_root, args.per_class, args.seed)
    frame.to_csv(store / "man_pages.csv", index=False)
    config = load_config(
        args.config,
        [
            f"data.path={store / 'man_pages.csv'}",
            "data.max_length=256",
            "data.split.test=0.3",
            f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
            f"tracking.artifact_location={(store / 'art').as_uri()}",
            f"output_dir={store / 'out'}",
            "registry.model_name=man-page-sections",
            *args.overrides,
        ],
    )
    run_id = start_pipeline_run(config)
    out = run_stages(config, run_id, until="quantize")
    stage = StageContext(config, Tracking.connect(config.tracking).run(run_id), "bench", 0.0)
    figures = measure(config, stage, out, store, frame, args.runs)
    report(figures, out.quantized)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


def measure(config, stage, out, store: Path, frame: pd.DataFrame, runs: int) -> dict:
    """Unfused fp32, fused fp32 and served graphs on the test split: scores and batch-1 p50."""
    tokenizer = load_tokenizer(config.model)
    unfused_dir = optimum_export(
        stage.fetch(out.merged.model), store / "unfused", "text-classification", None
    )
    files = {
        "fp32_unfused": unfused_dir / ONNX_FILE,
        "fp32_fused": stage.fetch(out.onnx.model) / ONNX_FILE,
        "served": stage.fetch(out.quantized.model) / SERVED_FILE,
    }
    threads = config.serve.num_threads or os.cpu_count() or 1
    sessions = {name: open_session(path, "cpu", threads) for name, path in files.items()}
    test = load_split(stage, out.data, "test")
    length = config.data.max_length
    logits = {
        name: session_logits(s, tokenizer, test["text"], length, 32) for name, s in sessions.items()
    }
    labels = np.asarray(test["labels"])
    accuracy = {name: float(np.mean(v.argmax(-1) == labels)) for name, v in logits.items()}
    reference = logits["fp32_fused"].argmax(-1)
    singles = [
        tokenizer([t], truncation=True, max_length=length, return_tensors="np")
        for t in test["text"][:64]
    ]
    p50 = alternating_p50(sessions, singles, warmup=20, runs=runs)
    token_counts = [len(ids) for ids in tokenizer(list(frame["text"]))["input_ids"]]
    return {
        "rows": len(frame),
        "test_rows": len(labels),
        "share_over_128_tokens": float(np.mean(np.array(token_counts) > 128)),
        "threads": threads,
        "accuracy": accuracy,
        "agreement_with_fp32_fused": {
            name: float(np.mean(v.argmax(-1) == reference)) for name, v in logits.items()
        },
        "fused_vs_unfused_max_abs_diff": max_abs_diff(logits["fp32_fused"], logits["fp32_unfused"]),
        "batch1_p50_ms": p50,
        "fused_ops": {
            op: n
            for op, n in graph_op_types(files["fp32_fused"]).items()
            if op in ("Attention", "SkipLayerNormalization", "BiasGelu", "EmbedLayerNormalization")
        },
        "served_variant": out.quantized.variant,
        "accuracy_drop_points": 100 * (accuracy["fp32_fused"] - accuracy["served"]),
        "p50_ratio_served_vs_fp32_fused": p50["served"] / p50["fp32_fused"],
        "p50_ratio_served_vs_fp32_unfused": p50["served"] / p50["fp32_unfused"],
        "p50_ratio_fused_vs_unfused": p50["fp32_fused"] / p50["fp32_unfused"],
    }


def report(f: dict, quantized) -> None:
    """The figures, the goals and every candidate of the quantize stage."""
    print(
        f"\ncorpus: {f['rows']} man-page texts, 5 sections, {f['test_rows']} test rows, "
        f"{100 * f['share_over_128_tokens']:.1f}% over 128 tokens; threads {f['threads']}"
    )
    print(
        f"fused ops: {f['fused_ops']}; fused vs unfused logits max abs diff "
        f"{f['fused_vs_unfused_max_abs_diff']:.2e}"
    )
    print(f"\n{'graph':<14}{'accuracy':>10}{'agreement':>11}{'b1 p50 ms':>11}")
    for name in ("fp32_unfused", "fp32_fused", "served"):
        print(
            f"{name:<14}{f['accuracy'][name]:>10.4f}{f['agreement_with_fp32_fused'][name]:>11.4f}"
            f"{f['batch1_p50_ms'][name]:>11.2f}"
        )
    served_ok = f["served_variant"] != "fp32"
    print(f"\nserved variant: {f['served_variant']} ({quantized.reason})")
    print(f"  int8 or mixed served         {served_ok!s:>8}   goal True")
    print(f"  accuracy drop (points)       {f['accuracy_drop_points']:>8.2f}   goal <= 0.5")
    print(
        f"  p50 served / fp32 fused      {f['p50_ratio_served_vs_fp32_fused']:>8.3f}   goal <= 0.4"
    )
    print(f"  p50 served / fp32 unfused    {f['p50_ratio_served_vs_fp32_unfused']:>8.3f}")
    print(f"  p50 fp32 fused / unfused     {f['p50_ratio_fused_vs_unfused']:>8.3f}")
    print(
        f"\n{'candidate (quantize stage)':<32}{'accuracy':>9}{'agree':>8}{'p50 ms':>8}"
        f"{'fp32 nodes':>11}{'gates':>7}"
    )
    for c in quantized.candidates:
        print(
            f"{c.name:<32}{c.scores['accuracy']:>9.4f}{c.scores['top1_agreement']:>8.4f}"
            f"{c.p50_ms:>8.2f}{len(c.kept_fp32):>11}{'pass' if c.passed else 'FAIL':>7}"
        )
    chosen = next((c for c in quantized.candidates if c.name == quantized.variant), None)
    for node, why in (chosen.kept_fp32 if chosen else {}).items():
        print(f"  fp32: {node}: {why}")


if __name__ == "__main__":
    main()
