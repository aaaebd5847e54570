"""Command line: `python -m flows.cli run --config configs/default.yaml --set train.epochs=1`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import redirect_stdout
from pathlib import Path

from tasks.common.errors import PipelineError

VERBOSE_HELP = "show every library's logs and warnings (default: stage lines and a summary)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-retrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the retrain flow")
    run.add_argument("--config", default="configs/default.yaml", help="YAML config file")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=1 (repeatable)",
    )
    run.add_argument(
        "--force", action="store_true", help="retrain even if this data and config already ran"
    )
    run.add_argument(
        "--wait",
        action="store_true",
        help="if a run with this data and config is in progress elsewhere, wait for it to end",
    )
    run.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    for action, text in (
        ("promote", "move production to a registered version"),
        ("rollback", "move production back to the previous version"),
    ):
        move = sub.add_parser(action, help=text)
        move.add_argument("--model", required=True, help="registered model name")
        if action == "promote":
            move.add_argument("--version", required=True, help="version number to promote")
            move.add_argument("--force", action="store_true", help="promote despite failed gates")
        move.add_argument(
            "--config",
            default="configs/default.yaml",
            help="config whose tracking section names the MLflow store",
        )
        move.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    watch = sub.add_parser("watch", help="run one data watch check and print the verdict")
    watch.add_argument("--config", default="configs/default.yaml", help="YAML config file")
    watch.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    watch.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    alerts = sub.add_parser(
        "alerts", help="create the alert automations on the Prefect server (PREFECT_API_URL)"
    )
    alerts.add_argument(
        "--block",
        required=True,
        help="notification block <type>/<name>, e.g. slack-webhook/ml-team, custom-webhook/ops",
    )
    check = sub.add_parser("check-config", help="validate a config and print it resolved")
    check.add_argument("--config", default="configs/default.yaml")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


class _HideUserErrorTracebacks(logging.Filter):
    """Prefect logs failures with tracebacks; a bad input deserves only its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], PipelineError):
            record.exc_info, record.exc_text = None, None
        return True


def _install_log_filter(verbose: bool = False) -> None:
    """Short user errors; unless verbose, the quiet terminal (flows/console.py)."""
    from flows.console import quiet, set_verbose

    for logger in (logging.getLogger(), logging.getLogger("prefect")):
        for handler in logger.handlers:
            handler.addFilter(_HideUserErrorTracebacks())
    set_verbose(verbose)
    if not verbose:
        quiet(logging.getLogger().handlers)  # the terminal's: Prefect's console handler


def _start_prefect_api() -> None:
    """Without a Prefect server (PREFECT_API_URL unset), start Prefect's temporary one now, in
    the main thread, with a watchdog: it then dies with this process even on SIGKILL (Prefect
    would stop it at exit only, which a killed process never reaches)."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    from tasks.common.processes import exclusive, process_target, watch

    settings = get_current_settings()
    if settings.api.url:
        return
    server = SubprocessASGIServer()  # the instance Prefect's clients use (port-keyed singleton)
    try:
        # one at a time per Prefect home: two first starts would race on its database tables
        with exclusive(Path(settings.home) / "lora-retrain-server.lock"):
            server.start()
    except RuntimeError as exc:
        raise PipelineError(
            f"Prefect's temporary API server did not start ({exc}); point PREFECT_API_URL at a "
            f"running Prefect server, or raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
        ) from None
    watch([process_target(server.server_process.pid)], grace_s=5)


def _before_a_flow(args) -> list[str]:
    """What `run` and `watch` do before their flow: credentials out of the overrides (never a
    flow parameter), the log filter, the checks that need no Prefect, then Prefect's API.
    Returns the overrides the flow gets."""
    from tasks.common.credentials import move_credentials_to_environment
    from tasks.common.preflight import check_before_prefect

    overrides = move_credentials_to_environment(args.overrides)
    _install_log_filter(args.verbose)
    check_before_prefect(args.config, overrides)
    _start_prefect_api()
    return overrides


def _run(args) -> dict:
    from flows.retrain import retrain_flow

    overrides = _before_a_flow(args)
    return retrain_flow(
        config_path=args.config, overrides=overrides, force=args.force, wait=args.wait
    )


def _watch(args) -> dict:
    """One watch check; its verdict on stderr (stdout carries the JSON)."""
    from flows.watch import watch_flow

    overrides = _before_a_flow(args)
    with redirect_stdout(sys.stderr):
        result = watch_flow(config_path=args.config, overrides=overrides)
    print(f"\n{result['verdict']}\nevents: {', '.join(result['events']) or 'none'}\n",
          file=sys.stderr)  # fmt: skip
    return result


def _summary(result: dict) -> None:
    """The closing summary table of a run, on stderr (stdout carries the JSON only)."""
    from flows.console import summary_table

    print(f"\n{summary_table(result)}\n", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            from tasks.common.config import load_config

            config = load_config(args.config, args.overrides)
            print(json.dumps(config.model_dump(mode="json"), indent=2))
            return 0
        if args.command in ("promote", "rollback"):
            from flows.promote import promote_flow

            _install_log_filter(args.verbose)
            _start_prefect_api()
            with redirect_stdout(sys.stderr):  # a library's print(): stdout is the JSON's
                result = promote_flow(
                    model_name=args.model,
                    action=args.command,
                    version=getattr(args, "version", None),
                    config_path=args.config,
                    force=getattr(args, "force", False),
                )
        elif args.command == "watch":
            result = _watch(args)
        elif args.command == "alerts":
            from flows.alerts import create_alerts

            result = {"automations": create_alerts(args.block), "block": args.block}
        else:
            with redirect_stdout(sys.stderr):
                result = _run(args)
            _summary(result)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
