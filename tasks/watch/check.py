"""One watch check: what changed in the source and the traffic since production was trained,
and which events that calls for.

- `lora.data.changed`: at least watch.min_new_rows new or changed labelled rows (or no
  production model yet and that many rows): retraining has something to learn from.
- `lora.drift.detected`: a drift test failed, on the new rows (label balance, text length,
  embeddings under the production model) or on the traffic (length, embeddings). Its payload
  says whether there are enough labelled rows to retrain (`retrain`); without them it is an
  alert, not a retrain.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tasks.common.config import PipelineConfig
from tasks.common.datasets import content_sha256
from tasks.common.drift import DriftTest, label_balance_test, length_test, mmd_test
from tasks.common.errors import ConfigError
from tasks.common.registry import version_by_alias
from tasks.common.tracking import Tracking
from tasks.kinds import kind_of
from tasks.watch.data import Rows, production_model, production_rows, source_rows, traffic_rows
from tasks.watch.embed import embed

DATA_CHANGED = "lora.data.changed"
DRIFT_DETECTED = "lora.drift.detected"
MIN_TEST_ROWS = 16  # fewer incoming texts than this: no drift test on them


@dataclass(frozen=True)
class WatchReport:
    """What one check found, and the events it calls for (the verdict in one line)."""

    model: str
    version: str | None
    production_run_id: str | None
    source_sha256: str
    production_sha256: str | None
    rows: int
    production_rows: int
    new_rows: int
    removed_rows: int
    retrain: bool
    verdict: str
    events: list[str] = field(default_factory=list)
    tests: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def sample(rows: Rows, size: int, seed: int) -> Rows:
    """At most `size` rows, drawn without replacement (seeded)."""
    if len(rows.texts) <= size:
        return rows
    mask = np.zeros(len(rows.texts), dtype=bool)
    mask[np.random.default_rng(seed).choice(len(rows.texts), size, replace=False)] = True
    return rows.where(mask)


def lengths(rows: Rows) -> np.ndarray:
    return np.array([len(text) for text in rows.texts], dtype=float)


def drift_tests(config: PipelineConfig, reference: Rows, incoming: dict[str, Rows], model_dir):
    """Each incoming set (new rows, traffic) against production's rows: label balance (labelled
    sets), text length and embedding MMD; sets under MIN_TEST_ROWS are not tested."""
    watch = config.watch
    tested = {k: sample(v, watch.sample_size, watch.seed) for k, v in incoming.items()}
    tested = {k: v for k, v in tested.items() if len(v.texts) >= MIN_TEST_ROWS}
    if not tested:
        return []
    base = sample(reference, watch.sample_size, watch.seed + 1)
    vectors = embed_all(model_dir(), {"production": base, **tested}, config.data.max_length)
    tests: list[DriftTest] = []
    for name, rows in tested.items():
        if rows.labels is not None:
            counts = label_balance_test(
                reference.label_counts(), incoming[name].label_counts(), watch.label_alpha
            )
            tests.append(named(counts, name))
        tests.append(named(length_test(lengths(base), lengths(rows), watch.length_alpha), name))
        mmd = mmd_test(
            vectors["production"],
            vectors[name],
            watch.embedding_alpha,
            permutations=watch.permutations,
            seed=watch.seed,
            max_samples=watch.sample_size,
        )
        tests.append(named(mmd, name))
    return tests


def named(test: DriftTest, on: str) -> DriftTest:
    """The test with the set it ran on in its name (new_rows.text_length, ...)."""
    return DriftTest(f"{on}.{test.name}", test.statistic, test.p_value, test.alpha,
                     test.drifted, test.detail)  # fmt: skip


def embed_all(model_dir: Path, sets: dict[str, Rows], max_length: int) -> dict[str, np.ndarray]:
    texts = [text for rows in sets.values() for text in rows.texts]
    vectors = embed(model_dir, texts, max_length)
    out, start = {}, 0
    for name, rows in sets.items():
        out[name] = vectors[start : start + len(rows.texts)]
        start += len(rows.texts)
    return out


def check(config: PipelineConfig, cache: Path) -> WatchReport:
    """Compare the source (and traffic) with the production model's training data."""
    if not kind_of(config).WATCHED:
        raise ConfigError(
            f"the data watch reads labelled text data; task {config.task} is not watched yet: "
            f"schedule its retrains (prefect.yaml) instead of triggering them from the watch"
        )
    source, files = source_rows(config)
    traffic = traffic_rows(config)
    tracking = Tracking.connect(config.tracking)
    name = config.registry.model_name
    version = version_by_alias(tracking.client, name, config.watch.alias)
    sha = content_sha256(files)
    if version is None:
        return first_model(config, source, sha)
    reference = production_rows(tracking, version.run_id, cache)
    new = ~np.isin(source.digests, reference.digests)
    incoming = {"new_rows": source.where(new)} | ({"traffic": traffic} if traffic else {})
    tests = drift_tests(
        config, reference, incoming, lambda: production_model(tracking, version.run_id, cache)
    )
    return decide(
        config,
        WatchReport(
            model=name,
            version=str(version.version),
            production_run_id=version.run_id,
            source_sha256=sha,
            production_sha256=version.tags.get("data.content_sha256"),
            rows=len(source.texts),
            production_rows=len(reference.texts),
            new_rows=int(new.sum()),
            removed_rows=int((~np.isin(reference.digests, source.digests)).sum()),
            retrain=False,
            verdict="",
            tests=[t.as_dict() for t in tests],
        ),
    )


def first_model(config: PipelineConfig, source: Rows, sha: str) -> WatchReport:
    """No production model yet: every row is new."""
    report = WatchReport(
        config.registry.model_name, None, None, sha, None, len(source.texts), 0,
        len(source.texts), 0, False, "",
    )  # fmt: skip
    return decide(config, report)


def decide(config: PipelineConfig, report: WatchReport) -> WatchReport:
    """The events and the verdict line for what the check measured."""
    enough = report.new_rows >= config.watch.min_new_rows
    drifted = [t["name"] for t in report.tests if t["drifted"]]
    events = ([DATA_CHANGED] if enough else []) + ([DRIFT_DETECTED] if drifted else [])
    parts = [f"{report.new_rows} new or changed labelled rows"]
    parts.append("enough to retrain" if enough else f"fewer than {config.watch.min_new_rows}")
    if drifted:
        parts.append("drift: " + ", ".join(drifted))
        if not enough:
            parts.append("not enough labelled rows to retrain on it")
    elif report.tests:
        parts.append("no drift")
    verdict = ("retrain" if enough else "alert" if drifted else "unchanged") + ": "
    return WatchReport(**{
        **asdict(report), "retrain": enough, "events": events, "verdict": verdict + "; ".join(parts)
    })  # fmt: skip
