"""The promotion report: JSON and Markdown in the MLflow run, and a Prefect artifact."""

from __future__ import annotations

from dataclasses import asdict

from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext

from tasks.common.tracking import TrackedRun, describe_run, run_url
from tasks.records import Evaluation, QuantizedModel, Registration, ServeReport
from tasks.register.model_card import gate_table


def search_tags(run) -> dict[str, str]:
    """The run's search.* tags (the study, its counts, the chosen values); none without one."""
    tags = run.client.get_run(run.run_id).data.tags
    return {k: v[:5000] for k, v in sorted(tags.items()) if k.startswith("search.")}


def decision_line(result: Registration, evaluation: Evaluation) -> str:
    """Where production is now and why, in one sentence."""
    if result.promoted:
        was = f" (was v{result.previous_production})" if result.previous_production else ""
        return f"Production moved to v{result.version}{was}: {result.reason}"
    held = f" at v{evaluation.production_version}" if evaluation.production_version else ""
    return f"Production kept{held}; v{result.version} not promoted: {result.reason}"


def key_figures(result: Registration, evaluation, served: ServeReport, quantized, metric) -> str:
    """The candidate's scores, the served variant and the gates, in a few Markdown lines."""
    failed = [g.name for g in result.gates if not g.passed]
    gates = f"{len(result.gates) - len(failed)}/{len(result.gates)} gates passed" + (
        f" (failed: {', '.join(failed)})" if failed else ""
    )
    lines = [
        f"- test {metric}: served {served.metrics[metric]:.4f}, adapter (PyTorch) "
        f"{evaluation.metrics[metric]:.4f}",
        f"- served: {quantized.variant} ONNX on {served.provider}",
        f"- {gates}",
    ]
    if result.comparison is not None:
        c = result.comparison
        lines.append(
            f"- against production v{evaluation.production_version}: {c.metric} "
            f"{c.delta:+.4f}, {c.confidence:.0%} CI [{c.low:+.4f}, {c.high:+.4f}]"
        )
    return "\n".join(lines)


def report_markdown(
    result: Registration,
    evaluation: Evaluation,
    quantized: QuantizedModel,
    served_line: str,
    run_link: str,
    search: dict[str, str] | None = None,
) -> str:
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
        + search_line(search or {})
        + f"MLflow run: {run_link}\n\n{gate_table(result.gates)}"
    )


def search_line(search: dict[str, str]) -> str:
    """The search that chose the training settings, from the run's search.* tags."""
    if "search.study" not in search:
        return ""
    chosen = ", ".join(
        f"{k.removeprefix('search.best.')} {v}"
        for k, v in search.items()
        if k.startswith("search.best.")
    )
    return (
        f"Search: study `{search['search.study']}`, {search['search.complete']} trials complete, "
        f"{search['search.pruned']} pruned, {search['search.failed']} failed; best trial "
        f"{search['search.best_trial']} ({search['search.objective']} "
        f"{search['search.best_value']}); chosen: {chosen}\n\n"
    )


def write_report(
    run: TrackedRun,
    result: Registration,
    served: ServeReport,
    evaluation: Evaluation,
    quantized: QuantizedModel,
    summary: str,
    metric: str,
) -> None:
    """promotion/report.json and .md in the run, the version's and the run's descriptions
    (decision and key figures), and a Prefect artifact inside a flow run."""
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
    search = search_tags(run)
    if search:
        report["search"] = search
    run.log_json(report, "promotion/report.json")
    link = run_url(run.tracking, run.run_id)
    served_line = f"{served.provider}; {summary}"
    markdown = report_markdown(result, evaluation, quantized, served_line, link, search)
    run.log_text(markdown, "promotion/report.md")
    decision = decision_line(result, evaluation)
    figures = key_figures(result, evaluation, served, quantized, metric)
    run.client.update_model_version(
        result.model_name, result.version, description=f"{decision}\n\n{figures}\n\nRun: {link}"
    )
    describe_run(run, f"**{decision}**\n\n{figures}")
    if FlowRunContext.get() is not None:  # outside a Prefect run there is nowhere to show it
        create_markdown_artifact(
            markdown=markdown,
            key="promotion-report",
            description=f"{result.model_name} v{result.version}",
        )
