"""The promotion report: JSON and Markdown in the MLflow run, and a Prefect artifact."""

from __future__ import annotations

from dataclasses import asdict

from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext

from tasks.common.tracking import TrackedRun
from tasks.records import Evaluation, QuantizedModel, Registration, ServeReport


def report_markdown(
    result: Registration, evaluation: Evaluation, quantized: QuantizedModel, served_line: str
) -> str:
    rows = "\n".join(
        f"| {g.name} | {g.value:.6g} | {g.comparison} {g.threshold:.6g} | "
        f"{'pass' if g.passed else 'FAIL'} |"
        for g in result.gates
    )
    comparison = ""
    if result.comparison is not None:
        c = result.comparison
        comparison = (
            f"\nCandidate minus production v{evaluation.production_version} ({c.metric}): "
            f"{c.delta:+.4f}, {c.confidence:.0%} CI [{c.low:+.4f}, {c.high:+.4f}]\n"
        )
    return (
        f"# {result.model_name} v{result.version}\n\n"
        f"**Production moved:** {'yes' if result.promoted else 'no'} ({result.reason})\n"
        f"{comparison}\n"
        f"Served: {quantized.variant} on {served_line}\n\n"
        f"| gate | value | required | result |\n|---|---|---|---|\n{rows}\n"
    )


def write_report(
    run: TrackedRun,
    result: Registration,
    served: ServeReport,
    evaluation: Evaluation,
    quantized: QuantizedModel,
    summary: str,
) -> None:
    """promotion/report.json and .md in the run; a Prefect artifact inside a flow run."""
    report = asdict(result) | {
        "candidate_served_metrics": served.metrics,
        "candidate_adapter_metrics": evaluation.metrics,
        "production_version": evaluation.production_version,
        "production_metrics": evaluation.production_metrics,
        "onnx_variant": quantized.variant,
        "onnx_variant_reason": quantized.reason,
        "provider": served.provider,
        "timings": served.timings,
    }
    run.log_json(report, "promotion/report.json")
    markdown = report_markdown(result, evaluation, quantized, f"{served.provider}; {summary}")
    run.log_text(markdown, "promotion/report.md")
    if FlowRunContext.get() is not None:  # outside a Prefect run there is nowhere to show it
        create_markdown_artifact(
            markdown=markdown,
            key="promotion-report",
            description=f"{result.model_name} v{result.version}",
        )
