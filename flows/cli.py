"""Command line: `python -m flows.cli run --config configs/default.yaml --set train.epochs=1`."""

from __future__ import annotations

import argparse
import json
import sys

from tasks.errors import PipelineError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-retrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the retrain flow")
    run.add_argument("--config", default="configs/default.yaml", help="YAML config file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set train.epochs=1 (repeatable)")
    check = sub.add_parser("check-config", help="validate a config and print it resolved")
    check.add_argument("--config", default="configs/default.yaml")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            from tasks.config import load_config

            config = load_config(args.config, args.overrides)
            print(json.dumps(config.model_dump(mode="json"), indent=2))
            return 0
        from flows.retrain import retrain_flow

        result = retrain_flow(config_path=args.config, overrides=args.overrides)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
