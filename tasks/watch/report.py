"""The drift report of one watch check: JSON, Markdown and a plot, in an MLflow run of the
`<experiment>-watch` experiment (one run per check, tagged with the model, the production
version and the verdict)."""

from __future__ import annotations

from pathlib import Path

from tasks.common.config import PipelineConfig
from tasks.common.plots import plt, save_figure
from tasks.common.tracking import Tracking
from tasks.watch.check import WatchReport

REPORT_JSON, REPORT_MD, REPORT_PLOT = "drift/report.json", "drift/report.md", "drift/tests.png"


def markdown(report: WatchReport) -> str:
    """The report as the MLflow run and the Prefect artifact show it."""
    rows = "\n".join(
        f"| {t['name']} | {t['statistic']:.4g} | {t['p_value']:.4g} | {t['alpha']:g} | "
        f"{'**drift**' if t['drifted'] else 'no'} |"
        for t in report.tests
    )
    version = f"v{report.version}" if report.version else "none yet"
    return (
        f"# Data watch: {report.model}\n\n**{report.verdict}**\n\n"
        f"- production: {version} (run `{report.production_run_id}`), trained on "
        f"{report.production_rows} rows, data sha256 `{report.production_sha256}`\n"
        f"- source now: {report.rows} rows, sha256 `{report.source_sha256}`; "
        f"{report.new_rows} new or changed, {report.removed_rows} gone\n"
        f"- events: {', '.join(report.events) or 'none'}\n\n"
        + (
            "| test | statistic | p-value | alpha | drift |\n|---|---|---|---|---|\n" + rows
            if rows
            else "No drift test ran (no new rows, no traffic, or too few texts).\n"
        )
    )


def plot(report: WatchReport, path: Path) -> Path | None:
    """Each test's p-value against its alpha (log scale): which test fired."""
    if not report.tests:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(report.tests)))
    names = [t["name"] for t in report.tests]
    values = [max(t["p_value"], 1e-6) for t in report.tests]
    colors = ["tab:red" if t["drifted"] else "tab:green" for t in report.tests]
    ax.barh(names, values, color=colors)
    for i, test in enumerate(report.tests):
        ax.plot([test["alpha"]] * 2, [i - 0.4, i + 0.4], color="black")
    ax.set_xscale("log")
    ax.set_xlabel("p-value (bar) and alpha (line); red: drift")
    ax.set_title(report.verdict[:90])
    fig.tight_layout()
    return save_figure(fig, path)


def log_report(config: PipelineConfig, report: WatchReport, folder: Path) -> str:
    """A run in `<experiment>-watch` holding the report; its id."""
    section = config.tracking.model_copy(
        update={"experiment": f"{config.tracking.experiment}-watch"}
    )
    tracking = Tracking.connect(section)
    created = tracking.client.create_run(
        tracking.experiment_id,
        run_name=f"watch-{report.model}",
        tags={
            "watch.model": report.model,
            "watch.production_version": report.version or "none",
            "watch.verdict": report.verdict[:5000],
            "watch.events": ",".join(report.events) or "none",
            "data.content_sha256": report.source_sha256,
        },
    )
    run = tracking.run(created.info.run_id)
    run.log_metrics(
        {"watch/new_rows": report.new_rows, "watch/removed_rows": report.removed_rows,
         "watch/rows": report.rows}
        | {f"watch/{t['name']}.p_value": t["p_value"] for t in report.tests}
    )  # fmt: skip
    run.log_json(report.as_dict(), REPORT_JSON)
    run.log_text(markdown(report), REPORT_MD)
    figure = plot(report, folder / "tests.png")
    if figure is not None:
        run.log_artifact(figure, "drift")
    tracking.client.set_terminated(run.run_id)
    return run.run_id
