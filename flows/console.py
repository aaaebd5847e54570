"""The pipeline in the terminal: one start line and one result line per stage, a closing
summary table, and the CLI's quiet mode (third-party chatter we do not cause, filtered by
logger and message; `-v` keeps all of it).

run_stages reports each stage here (`stage_started`, `stage_finished`); the lines go to the
Prefect run logger (the flow run's Logs tab too) and the stage rows are kept for the CLI's
summary table (`summary_table`), which also shows the gates, the decision and where to look.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import datasets

from tasks.common.config import PipelineConfig
from tasks.common.console import TTY_BAR, VERBOSE_ENV, DropMessages, run_logger
from tasks.common.credentials import redact
from tasks.common.distributed import nproc_per_node
from tasks.common.gates import Gate
from tasks.common.tracking import Tracking, run_url
from tasks.records import (
    Evaluation,
    MergedModel,
    OnnxModel,
    PreparedData,
    QuantizedModel,
    Registration,
    ServeReport,
    TrainedAdapter,
)
from tasks.search.space import label

# Third-party messages that tell a user of the CLI nothing (shown with -v): logger -> pattern
CHATTER = {
    "mlflow.store.db.utils": r"^(Creating initial MLflow database tables|Updating database tables)",
    "mlflow.pyfunc": r"^Validating input example against model signature",
}
SPLIT_ORDER = ("train", "validation", "test")


def count(n: int) -> str:
    """1234567 -> 1.2M, 4096 -> 4.1k."""
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def gate_text(gate: Gate) -> str:
    verdict = "passed" if gate.passed else "FAILED"
    return f"{gate.name} {gate.value:.3g} {gate.comparison} {gate.threshold:.3g} {verdict}"


def gates_text(gates: list[Gate]) -> str:
    """Each gate for one or two, else how many passed (and which failed)."""
    if len(gates) <= 2:
        return ", ".join(gate_text(g) for g in gates) or "no gates"
    failed = [g for g in gates if not g.passed]
    if not failed:
        return f"{len(gates)} gates passed"
    return f"{len(gates) - len(failed)}/{len(gates)} gates passed, " + ", ".join(
        gate_text(g) for g in failed
    )


def _prepared(record: PreparedData, config: PipelineConfig) -> str:
    order = sorted(record.rows, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 9, s))
    rows = " / ".join(f"{record.rows[split]} {split}" for split in order)
    dropped = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in record.dropped.items() if n)
    return f"{rows} rows" + (f" (dropped {dropped})" if dropped else "")


def _trained(record: TrainedAdapter, config: PipelineConfig) -> str:
    share = record.trainable_params / record.total_params if record.total_params else 0.0
    dist = config.train.distributed
    ranks = f" x {dist.nnodes * nproc_per_node(dist)} ranks ({dist.strategy})"
    return (
        f"{record.global_steps} steps on {record.device}"
        + (ranks if dist.strategy != "none" else "")
        + f" ({record.precision}), "
        f"{count(record.trainable_params)} of {count(record.total_params)} parameters "
        f"trained ({share:.2%})"
    )


def _searched(record: TrainedAdapter, config: PipelineConfig) -> str:
    chosen = ", ".join(f"{k} {label(v)}" for k, v in record.chosen.items())
    return f"best trial: {chosen}; {_trained(record, config)}"


def _evaluated(record: Evaluation, config: PipelineConfig) -> str:
    metric = config.registry.metric
    text = f"test {metric} {record.metrics.get(metric, float('nan')):.3f}"
    if record.production_metrics and metric in record.production_metrics:
        production = record.production_metrics[metric]
        text += f", production v{record.production_version} {production:.3f}"
    elif record.production_refusal:
        text += f", production not comparable ({record.production_refusal})"
    return text


def _merged(record: MergedModel, config: PipelineConfig) -> str:
    return gate_text(record.parity)


def _exported(record: OnnxModel, config: PipelineConfig) -> str:
    return gates_text(record.gates)


def _quantized(record: QuantizedModel, config: PipelineConfig) -> str:
    chosen = next((c for c in record.candidates if c.name == record.variant), None)
    latency = f", {chosen.p50_ms:.1f} ms p50" if chosen else ""
    verdict = "gates passed" if all(g.passed for g in record.gates) else gates_text(record.gates)
    text = (
        f"chose {record.variant} ({record.instruction_set}){latency}, {record.score_name} "
        f"{record.served_score:.3f} (fp32 {record.fp32_score:.3f}), {verdict}"
    )
    return text if record.variant != "fp32" else f"{text}; {record.reason}"


def _served(record: ServeReport, config: PipelineConfig) -> str:
    metric = config.registry.metric
    score = record.metrics.get(metric, float("nan"))
    return f"served {metric} {score:.3f} on {record.provider}, {len(record.answers)} answers"


def _registered(record: Registration, config: PipelineConfig) -> str:
    return f"{record.model_name} v{record.version}, {decision_text(record)}"


SUMMARIES: dict[str, Callable] = {
    "prepare_data": _prepared,
    "search": _searched,
    "train_lora": _trained,
    "evaluate": _evaluated,
    "merge": _merged,
    "export_onnx": _exported,
    "quantize": _quantized,
    "serve_check": _served,
    "register": _registered,
}


def stage_summary(name: str, record, config: PipelineConfig) -> str:
    """The stage's key figure and gates in one line, read from its record."""
    summary = SUMMARIES.get(name)
    return summary(record, config) if summary else type(record).__name__


def decision_text(registration: Registration) -> str:
    moved = "production moved to this version" if registration.promoted else "production kept"
    return f"{moved}: {registration.reason}"


@dataclass
class StageRow:
    name: str
    seconds: float
    summary: str
    reused: bool = False


@dataclass
class RunReport:
    """What the summary table shows of the last run_stages in this process."""

    config: PipelineConfig | None = None
    rows: list[StageRow] = field(default_factory=list)
    registration: Registration | None = None


REPORT = RunReport()


def stage_started(config: PipelineConfig, name: str, number: int, total: int) -> None:
    """The stage's start line; the first stage starts a new report."""
    if number == 1:
        REPORT.config, REPORT.rows, REPORT.registration = config, [], None
    run_logger().info("%s (%d/%d) ...", name, number, total)


def stage_finished(name: str, record, seconds: float, reused: bool = False) -> None:
    """The stage's result line (its key figure and gates), kept for the summary table."""
    summary = stage_summary(name, record, REPORT.config)
    REPORT.rows.append(StageRow(name, seconds, summary, reused))
    if isinstance(record, Registration):
        REPORT.registration = record
    when = "done in an earlier attempt" if reused else f"{seconds:.1f} s"
    run_logger().info("%s: %s  [%s]", name, summary, when)


def _gate_lines(registration: Registration | None) -> list[str]:
    if registration is None:
        return ["gates     (not reached)"]
    lines = []
    width = max((len(g.name) for g in registration.gates), default=0)
    for i, gate in enumerate(registration.gates):
        label = "gates" if i == 0 else ""
        mark = "ok    " if gate.passed else "FAILED"
        lines.append(
            f"{label:<9} {mark} {gate.name:<{width}}  {gate.value:.3g} {gate.comparison} "
            f"{gate.threshold:.3g}"
        )
    return lines or ["gates     none"]


def _where(result: dict, config: PipelineConfig | None) -> list[str]:
    if config is None:
        return [f"look      MLflow run {result.get('run_id')}"]
    tracking = Tracking.connect(config.tracking)
    lines = [f"look      {run_url(tracking, result.get('run_id'))}"]
    if not tracking.uri.startswith(("http://", "https://")):  # an embedded store: no UI yet
        lines.append(f"          (`make ui` or `make up` first: {redact(tracking.uri)})")
    return lines


def summary_table(result: dict) -> str:
    """Stages and their seconds, the gates, the decision and where to look."""
    if result.get("status") == "skipped":
        return f"decision  skipped: {result.get('reason')}"
    rows = REPORT.rows
    width = max([len(r.name) for r in rows] + [5])
    lines = [f"{'stage':<{width}}  {'time':>7}  result"]
    for row in rows:
        when = "earlier" if row.reused else f"{row.seconds:.1f} s"
        lines.append(f"{row.name:<{width}}  {when:>7}  {row.summary}")
    total = sum(r.seconds for r in rows)
    lines += [f"{'total':<{width}}  {f'{total:.1f} s':>7}", ""]
    lines += _gate_lines(REPORT.registration)
    if REPORT.registration is not None:
        name, version = REPORT.registration.model_name, REPORT.registration.version
        lines.append(f"decision  {name} v{version}: {decision_text(REPORT.registration)}")
    return "\n".join([*lines, *_where(result, REPORT.config)])


class QuietConsole(logging.Filter):
    """On the terminal's handler only (the Prefect UI keeps them): each stage task's
    'Finished in state Completed()' (the stage's result line says it), and the step lines
    a TTY shows as a progress bar instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, TTY_BAR, False):
            return False
        return not (
            record.name == "prefect.task_runs"
            and record.getMessage().startswith("Finished in state Completed(")
        )


def set_verbose(on: bool) -> None:
    """-v: every third-party message, the ones our code knows it causes included."""
    if on:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)


def quiet(console_handlers: list[logging.Handler]) -> None:
    """Quiet mode of the CLI: no progress bars of datasets and MLflow artifact transfers, no
    CHATTER, and QuietConsole on the terminal's handlers."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    datasets.disable_progress_bars()
    for name, pattern in CHATTER.items():
        logging.getLogger(name).addFilter(DropMessages(pattern))
    for handler in console_handlers:
        handler.addFilter(QuietConsole())
