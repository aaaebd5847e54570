"""False-alarm rate and power of the drift tests in tasks/common/drift.py, on synthetic data.

For each test (label_balance: chi-square, text_length: Kolmogorov-Smirnov, embedding_mmd: kernel
MMD with a permutation p-value) and each case, the script draws --seeds independent reference /
current pairs of the sizes a data watch compares (256 rows per side, embeddings of width 384) and
counts how often the test says drifted at alpha 0.05:
  - null cases (both sides from the same law): that rate is the false-alarm rate (goal ~0.05);
  - shifted cases of graded size: that rate is the power (detection rate):
      label shift: one of 5 equally common labels grows from a 20% share to 25/30/35/40%;
      embedding mean shift: N(0, I) vs N(delta * 1, I), delta 0.02/0.05/0.1;
      topic shift: unit-norm mixture embeddings (8 topics sharing a common direction), the
        reference has 1% of its rows from one topic, the current 10%/30%/60%;
      text length: lognormal lengths (median ~88 characters, like the demo tickets) x 1.1/1.2/1.5.
No model and no files are read. The MMD runs with fewer permutations than the library default
(--permutations, default 200) to keep the run short; the output says how many.

Run:  .venv/bin/python benchmarks/drift.py [--seeds 200] [--permutations 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.common.drift import DriftTest, label_balance_test, length_test, mmd_test  # noqa: E402

ALPHA = 0.05
N_PER_SIDE = 256
DIM = 384
N_LABELS = 5
N_TOPICS = 8
RARE_TOPIC_SHARE = 0.01

Case = tuple[str, str, float, Callable[[np.random.Generator, int], DriftTest]]


def label_case(grown_share: float) -> Callable[[np.random.Generator, int], DriftTest]:
    """Reference: 5 equal labels; current: label 0 at grown_share, the others equal."""
    reference = np.full(N_LABELS, 1.0 / N_LABELS)
    current = np.r_[grown_share, np.full(N_LABELS - 1, (1.0 - grown_share) / (N_LABELS - 1))]
    names = [f"label{i}" for i in range(N_LABELS)]

    def run(rng: np.random.Generator, seed: int) -> DriftTest:
        ref = dict(
            zip(names, (int(c) for c in rng.multinomial(N_PER_SIDE, reference)), strict=True)
        )
        cur = dict(zip(names, (int(c) for c in rng.multinomial(N_PER_SIDE, current)), strict=True))
        return label_balance_test(ref, cur, ALPHA)

    return run


def length_case(scale: float) -> Callable[[np.random.Generator, int], DriftTest]:
    """Lognormal lengths in whole characters; the current side scaled by `scale`."""

    def draw(rng: np.random.Generator, factor: float) -> np.ndarray:
        return np.maximum(1.0, np.round(factor * rng.lognormal(np.log(88.0), 0.35, N_PER_SIDE)))

    def run(rng: np.random.Generator, seed: int) -> DriftTest:
        return length_test(draw(rng, 1.0), draw(rng, scale), ALPHA)

    return run


def mean_shift_case(
    delta: float, permutations: int
) -> Callable[[np.random.Generator, int], DriftTest]:
    """N(0, I) against N(delta on every coordinate, I) in DIM dimensions."""

    def run(rng: np.random.Generator, seed: int) -> DriftTest:
        reference = rng.normal(size=(N_PER_SIDE, DIM))
        current = rng.normal(loc=delta, size=(N_PER_SIDE, DIM))
        return mmd_test(reference, current, ALPHA, permutations=permutations, seed=seed)

    return run


def topic_rows(rng: np.random.Generator, rare_share: float) -> np.ndarray:
    """Unit-norm rows from a topic mixture: intra-topic cosine ~0.4, inter-topic ~0.2 (like
    sentence embeddings, which share a common direction); topic 0 drawn with rare_share."""
    basis = np.random.default_rng(12345).normal(size=(N_TOPICS + 1, DIM))  # fixed topics
    basis /= np.linalg.norm(basis, axis=1, keepdims=True)
    common, centers = basis[0], basis[1:]
    weights = np.r_[rare_share, np.full(N_TOPICS - 1, (1.0 - rare_share) / (N_TOPICS - 1))]
    topics = rng.choice(N_TOPICS, size=N_PER_SIDE, p=weights)
    noise = rng.normal(scale=0.9 / np.sqrt(DIM), size=(N_PER_SIDE, DIM))
    rows = 0.55 * common + 0.5 * centers[topics] + noise
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def topic_case(share: float, permutations: int) -> Callable[[np.random.Generator, int], DriftTest]:
    """Reference with 1% of rows from the rare topic; current with `share` from it."""

    def run(rng: np.random.Generator, seed: int) -> DriftTest:
        reference, current = topic_rows(rng, RARE_TOPIC_SHARE), topic_rows(rng, share)
        return mmd_test(reference, current, ALPHA, permutations=permutations, seed=seed)

    return run


def cases(permutations: int) -> list[Case]:
    """(test, case, size, runner) for every row of the table; size 0 / 1.0 / share 1% = null."""
    rows: list[Case] = [("label_balance", "same shares", 0.20, label_case(0.20))]
    rows += [
        ("label_balance", "label0 share ->", s, label_case(s)) for s in (0.25, 0.30, 0.35, 0.40)
    ]
    rows += [("text_length", "same law", 1.0, length_case(1.0))]
    rows += [("text_length", "length x", s, length_case(s)) for s in (1.1, 1.2, 1.5)]
    rows += [("embedding_mmd", "same gaussian", 0.0, mean_shift_case(0.0, permutations))]
    rows += [
        ("embedding_mmd", "mean shift +", d, mean_shift_case(d, permutations))
        for d in (0.02, 0.05, 0.1)
    ]
    rows += [("embedding_mmd", "same topic mix", 0.01, topic_case(RARE_TOPIC_SHARE, permutations))]
    rows += [
        ("embedding_mmd", "rare topic share ->", s, topic_case(s, permutations))
        for s in (0.1, 0.3, 0.6)
    ]
    return rows


def measure(seeds: int, permutations: int) -> list[dict]:
    """Run every case over `seeds` seeds; the drifted rate, mean p-value and time per test."""
    results = []
    for index, (test, case, size, runner) in enumerate(cases(permutations)):
        null = case.startswith("same")
        started, drifted, p_values = time.perf_counter(), 0, []
        for seed in range(seeds):
            outcome = runner(np.random.default_rng([index, seed]), seed)
            drifted += outcome.drifted
            p_values.append(outcome.p_value)
        elapsed = time.perf_counter() - started
        results.append(
            {
                "test": test,
                "case": case,
                "size": size,
                "kind": "false_alarm" if null else "power",
                "rate": drifted / seeds,
                "drifted": drifted,
                "seeds": seeds,
                "median_p_value": float(np.median(p_values)),
                "ms_per_test": 1000.0 * elapsed / seeds,
            }
        )
    return results


def print_table(results: list[dict], seeds: int, permutations: int) -> None:
    """The results as a fixed-width table."""
    print(
        f"drift tests at alpha {ALPHA}, {seeds} seeds per case, {N_PER_SIDE} rows per side, "
        f"embeddings {DIM}-d; MMD with {permutations} permutations (library default 500)"
    )
    header = f"{'test':<14} {'case':<20} {'size':>6} {'kind':<12} {'rate':>6} {'drifted':>9}"
    print(header + f" {'median p':>9} {'ms/test':>8}")
    print("-" * (len(header) + 19))
    for row in results:
        print(
            f"{row['test']:<14} {row['case']:<20} {row['size']:>6g} {row['kind']:<12} "
            f"{row['rate']:>6.3f} {row['drifted']:>4}/{row['seeds']:<4} "
            f"{row['median_p_value']:>9.3g} {row['ms_per_test']:>8.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, measure, print, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200, help="pairs drawn per case")
    parser.add_argument("--permutations", type=int, default=200, help="MMD permutations")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = measure(args.seeds, args.permutations)
    wall = time.perf_counter() - started
    print_table(results, args.seeds, args.permutations)
    print(f"wall time {wall:.1f} s")
    if args.json:
        payload = {
            "alpha": ALPHA,
            "seeds": args.seeds,
            "permutations": args.permutations,
            "n_per_side": N_PER_SIDE,
            "dim": DIM,
            "wall_s": wall,
            "results": results,
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
