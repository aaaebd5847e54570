"""What the terminal shows: training progress lines (or a bar on a TTY) and quieting the
messages we know we cause.

Training reports `step 40/99  loss 0.412  lr 3.1e-4  12.3 it/s  eta 0:05` at every logging
step through the Prefect run logger (the run's Logs tab too); on a TTY a single updating bar
replaces those lines in the terminal. `expected` and `expected_warning` drop one known,
harmless message while a block runs (e.g. the new-head notice when a base model is loaded into
a classifier); the CLI's -v (LORA_RETRAIN_VERBOSE=1) keeps them.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from prefect import get_run_logger
from prefect.exceptions import MissingContextError
from transformers import TrainerCallback

VERBOSE_ENV = "LORA_RETRAIN_VERBOSE"
TTY_BAR = "lora_tty_bar"  # a log record's attribute: the terminal shows the bar instead
BAR_WIDTH = 24
EVAL_SKIP = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch")


def verbose() -> bool:
    """Whether every third-party message is wanted (the CLI's -v)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow or task run, else the `lora_retrain` logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("lora_retrain")


def log_to_stderr() -> None:
    """Outside a Prefect run (a training rank under torchrun): the `lora_retrain` logger's
    lines to stderr, less the step lines a TTY shows as a bar."""
    logger = logging.getLogger("lora_retrain")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s | %(message)s", "%H:%M:%S"))
    handler.addFilter(lambda record: not getattr(record, TTY_BAR, False))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # not twice through the root logger's console handler


class DropMessages(logging.Filter):
    """Drops the records whose message matches `pattern` (and, given `source`, whose emitting
    file's path contains it); every other record passes."""

    def __init__(self, pattern: str, source: str | None = None):
        super().__init__()
        self.pattern, self.source = re.compile(pattern), source

    def filter(self, record: logging.LogRecord) -> bool:
        if self.source is not None and self.source not in record.pathname.replace("\\", "/"):
            return True
        return not self.pattern.search(record.getMessage())


@contextmanager
def expected(loggers: str | tuple[str, ...], pattern: str, source: str | None = None):
    """While the block runs, drop messages of these loggers ("" is the root logger) that match
    pattern: one we know the block causes and that asks nothing of the user. Kept with -v."""
    if verbose():
        yield
        return
    names = (loggers,) if isinstance(loggers, str) else loggers
    drop = DropMessages(pattern, source)
    for name in names:
        logging.getLogger(name).addFilter(drop)
    try:
        yield
    finally:
        for name in names:
            logging.getLogger(name).removeFilter(drop)


@contextmanager
def expected_warning(category: type[Warning], module: str, message: str = "") -> Iterator[None]:
    """While the block runs, ignore `category` warnings raised from modules matching `module`
    whose text starts with `message` (regexes, as warnings.filterwarnings takes them). Kept
    with -v."""
    with warnings.catch_warnings():
        if not verbose():
            warnings.filterwarnings("ignore", message, category=category, module=module)
        yield


def format_lr(lr: float) -> str:
    """3.1e-4 (two significant digits, no exponent padding)."""
    if lr == 0:
        return "0"
    mantissa, exponent = f"{lr:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def format_duration(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour on."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_rate(rate: float) -> str:
    return f"{rate:.1f}" if rate >= 1 else f"{rate:.2f}"


def progress_line(step: int, total: int, loss: float, lr: float, rate: float, eta_s: float) -> str:
    """`step 40/99  loss 0.412  lr 3.1e-4  12.3 it/s  eta 0:05`."""
    return (
        f"step {step}/{total}  loss {loss:.3f}  lr {format_lr(lr)}  "
        f"{format_rate(rate)} it/s  eta {format_duration(eta_s)}"
    )


def progress_bar(step: int, total: int, loss: float | None, rate: float, eta_s: float) -> str:
    """`train [#########---------------] 40/99  loss 0.412  12.3 it/s  eta 0:05`."""
    done = min(BAR_WIDTH, round(BAR_WIDTH * step / total)) if total else BAR_WIDTH
    loss_text = "" if loss is None else f"  loss {loss:.3f}"
    return (
        f"train [{'#' * done}{'-' * (BAR_WIDTH - done)}] {step}/{total}{loss_text}  "
        f"{format_rate(rate)} it/s  eta {format_duration(eta_s)}"
    )


def eval_line(logs: dict, epoch: float | None) -> str:
    """`eval  epoch 1  loss 1.407  accuracy 0.250  macro_f1 0.189`."""
    figures = "  ".join(
        f"{key.removeprefix('eval_')} {value:.3f}"
        for key, value in logs.items()
        if key.startswith("eval_") and key not in EVAL_SKIP and isinstance(value, int | float)
    )
    return f"eval  epoch {epoch or 0:g}  {figures}"


class TrainingProgress(TrainerCallback):
    """The Trainer's progress as step lines at every logging step (and eval lines), through
    the run logger; on a TTY also an updating bar, which the terminal shows instead of the
    step lines (the CLI drops records marked TTY_BAR from its console)."""

    def __init__(self, stream: TextIO | None = None, clock=time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        self.bar = bool(getattr(self.stream, "isatty", lambda: False)())
        self.clock = clock
        self.start, self.first_step, self.loss = 0.0, 0, None

    def speed(self, step: int, total: int) -> tuple[float, float]:
        """(steps per second since this process started training, seconds left)."""
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = (step - self.first_step) / elapsed
        return rate, ((total - step) / rate if rate > 0 else 0.0)

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.first_step = self.clock(), state.global_step  # resumed: counts from here

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar and state.is_world_process_zero:
            rate, eta = self.speed(state.global_step, state.max_steps)
            text = progress_bar(state.global_step, state.max_steps, self.loss, rate, eta)
            self.stream.write(f"\r{text}\x1b[K")
            self.stream.flush()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        if "loss" in logs:
            self.loss = float(logs["loss"])
            rate, eta = self.speed(state.global_step, state.max_steps)
            lr = float(logs.get("learning_rate", 0.0))
            line = progress_line(state.global_step, state.max_steps, self.loss, lr, rate, eta)
            run_logger().info(line, extra={TTY_BAR: self.bar})
        elif any(key.startswith("eval_") for key in logs):
            self.clear_bar()
            run_logger().info(eval_line(logs, state.epoch))

    def clear_bar(self) -> None:
        if self.bar:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def on_train_end(self, args, state, control, **kwargs):
        self.clear_bar()
