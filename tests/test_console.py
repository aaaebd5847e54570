"""The quiet terminal: training progress lines (and the TTY bar), stage lines, the summary
table, the narrow filters, and the CLI demo on the tiny model with none of the known noise."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from flows import console as flow_console
from flows.console import QuietConsole, stage_finished, stage_started, stage_summary, summary_table
from tasks.common.console import (
    TTY_BAR,
    VERBOSE_ENV,
    TrainingProgress,
    eval_line,
    expected,
    expected_warning,
    format_duration,
    format_lr,
    progress_bar,
    progress_line,
)
from tasks.common.gates import evaluate_gate
from tasks.common.quantization import Candidate
from tasks.common.tracking import ArtifactRef
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

ROOT = Path(__file__).resolve().parents[1]
REF = ArtifactRef("run", "path", "/tmp/x")
STEP_LINE = re.compile(
    r"step \d+/\d+  loss \d+\.\d{3}  lr \d(\.\d)?e-?\d+  \d+\.\d+ it/s  eta (\d+:)?\d+:\d\d$"
)
# What a user saw before (issue 13): none of it may reach the terminal of a quiet run.
NOISE = [
    r"Disassembly",
    r"\b(LOAD_GLOBAL|LOAD_ATTR|LOAD_FAST|LOAD_METHOD|RESUME|RETURN_VALUE|PRECALL|KW_NAMES)\b",
    r"Axis -?\d+ is out-of-range",
    r"Expected bias .* to be an initializer",
    r"Bias of Gemm node",
    r"newly initialized",
    r"You should probably TRAIN",
    r"TracerWarning",
    r"torch_dtype",
    r"already exists",
    r"Created version '",
    r"\x1b\[",
    r"UserWarning",
    r"Add type hints",
    r"can be interpreted in multiple ways",
    r"\{'loss': ",
    r"Downloading artifacts",
    r"Saving the dataset",
    r"Generating train split",
    r"Creating initial MLflow database tables",
    r"Validating input example",
]
THIRD_PARTY = r"newly initialized|Axis -?\d+ is out-of-range|TracerWarning|Saving the dataset"


def test_progress_line_reads_like_the_issue():
    assert progress_line(40, 99, 0.41249, 3.14e-4, 12.34, 5.2) == (
        "step 40/99  loss 0.412  lr 3.1e-4  12.3 it/s  eta 0:05"
    )
    assert STEP_LINE.match(progress_line(1, 3, 1.0, 0.01, 0.5, 4000))


def test_learning_rates_and_durations():
    assert [format_lr(x) for x in (3.1e-4, 5e-3, 1.0, 0)] == ["3.1e-4", "5.0e-3", "1.0e0", "0"]
    assert [format_duration(s) for s in (0, 5.4, 65, 3600 + 62, -3)] == [
        "0:00",
        "0:05",
        "1:05",
        "1:01:02",
        "0:00",
    ]


def test_bar_and_eval_lines():
    assert progress_bar(12, 24, 0.5, 2.0, 6.0) == (
        f"train [{'#' * 12}{'-' * 12}] 12/24  loss 0.500  2.0 it/s  eta 0:06"
    )
    logs = {"eval_loss": 1.4071, "eval_macro_f1": 0.1886, "eval_runtime": 0.2, "epoch": 1.0}
    assert eval_line(logs, 1.0) == "eval  epoch 1  loss 1.407  macro_f1 0.189"


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _train(progress: TrainingProgress, clock: FakeClock, start_step: int = 0):
    """Ten steps of 0.5 s out of 20, logged every 5 steps; returns the logged records."""
    state = SimpleNamespace(global_step=start_step, max_steps=20, is_world_process_zero=True)
    state.epoch = 0.5
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("lora_retrain")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        progress.on_train_begin(None, state, None)
        for _ in range(10):
            clock.now += 0.5
            state.global_step += 1
            progress.on_step_end(None, state, None)
            if state.global_step % 5 == 0:
                progress.on_log(None, state, None, logs={"loss": 0.25, "learning_rate": 1e-3})
        progress.on_log(None, state, None, logs={"eval_loss": 0.3, "epoch": 0.5})
        progress.on_train_end(None, state, None)
    finally:
        logger.removeHandler(handler)
    return records


def test_progress_counts_rate_and_eta_from_this_process():
    clock = FakeClock()
    stream = io.StringIO()
    records = _train(TrainingProgress(stream, clock), clock, start_step=4)  # resumed at 4
    lines = [r.getMessage() for r in records]
    assert lines == [  # steps 5..14 at 2 steps a second: 15 to go after step 5, 10 after 10
        "step 5/20  loss 0.250  lr 1.0e-3  2.0 it/s  eta 0:08",
        "step 10/20  loss 0.250  lr 1.0e-3  2.0 it/s  eta 0:05",
        "eval  epoch 0.5  loss 0.300",
    ]
    assert all(STEP_LINE.match(line) for line in lines[:-1])
    assert stream.getvalue() == ""  # not a TTY: lines only, no bar
    assert not any(getattr(r, TTY_BAR, False) for r in records)


def test_a_tty_gets_one_updating_bar_and_the_terminal_drops_the_step_lines():
    clock = FakeClock()
    stream = Tty()
    records = _train(TrainingProgress(stream, clock), clock)
    drawn = stream.getvalue()
    assert drawn.count("\r") >= 10 and "\n" not in drawn
    assert "train [" in drawn and "10/20" in drawn
    steps = [r for r in records if r.getMessage().startswith("step ")]
    assert steps and all(getattr(r, TTY_BAR) for r in steps)
    assert not any(QuietConsole().filter(r) for r in steps)  # terminal: the bar instead
    evals = [r for r in records if r.getMessage().startswith("eval ")]
    assert evals and all(QuietConsole().filter(r) for r in evals)


def test_quiet_console_drops_only_completed_task_states():
    def record(name, message, level=logging.INFO):
        return logging.LogRecord(name, level, __file__, 1, message, None, None)

    quiet = QuietConsole()
    assert not quiet.filter(record("prefect.task_runs", "Finished in state Completed()"))
    assert quiet.filter(record("prefect.task_runs", "Finished in state Failed('boom')"))
    assert quiet.filter(record("prefect.flow_runs", "Finished in state Completed()"))


def test_expected_drops_one_message_of_one_logger_and_verbose_keeps_it(monkeypatch, caplog):
    log = logging.getLogger("some.library")
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    with caplog.at_level(logging.INFO), expected("some.library", "^harmless"):
        log.warning("harmless notice")
        log.warning("a real problem")
        logging.getLogger("other.library").warning("harmless elsewhere")
    log.warning("harmless after the block")
    monkeypatch.setenv(VERBOSE_ENV, "1")
    with expected("some.library", "^harmless"):
        log.warning("harmless but verbose")
    assert [r.getMessage() for r in caplog.records] == [
        "a real problem",
        "harmless elsewhere",
        "harmless after the block",
        "harmless but verbose",
    ]


def test_expected_warning_ignores_one_category_from_matching_modules(monkeypatch):
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with expected_warning(RuntimeWarning, module=r"test_console", message="drop"):
            warnings.warn("dropped", RuntimeWarning, stacklevel=1)
            warnings.warn("kept: another text", RuntimeWarning, stacklevel=1)
            warnings.warn("dropped? no: another category", UserWarning, stacklevel=1)
        warnings.warn("dropped after? no", RuntimeWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == [
        "kept: another text",
        "dropped? no: another category",
        "dropped after? no",
    ]


def _records():
    gates = [
        evaluate_gate("merge_parity_max_abs_diff", 3e-7, 1e-4, "<="),
        evaluate_gate("onnx_parity_max_abs_diff", 5e-7, 1e-4, "<="),
        evaluate_gate("onnx_argmax_mismatches", 0, 0, "<="),
    ]
    int8 = Candidate("dynamic_per_channel", "model.onnx", {"accuracy": 0.86}, 2.14, 20.0)
    return {
        "prepare_data": PreparedData(
            REF, {"test": 40, "train": 140, "validation": 20}, "sha", {"duplicates": 2}
        ),
        "train_lora": TrainedAdapter(REF, "cpu", "fp32", 1234, 1_200_000, 99),
        "evaluate": Evaluation({"macro_f1": 0.8621}, "3", {"macro_f1": 0.85}),
        "merge": MergedModel(REF, gates[0]),
        "export_onnx": OnnxModel(REF, gates[1:]),
        "quantize": QuantizedModel(
            REF, "dynamic_per_channel", "avx2", "accuracy", 0.87, 0.86, "fastest", [], [int8]
        ),
        "serve_check": ServeReport("CPUExecutionProvider", {"macro_f1": 0.86}, {}, ["a"], [], []),
        "register": Registration(
            "support", "4", "models:/m-1", False, "worse than production", "3", gates
        ),
    }


def test_stage_lines_carry_the_key_figure_and_gates(tiny_config):
    summaries = {n: stage_summary(n, r, tiny_config) for n, r in _records().items()}
    assert summaries == {
        "prepare_data": "140 train / 20 validation / 40 test rows (dropped 2 duplicates)",
        "train_lora": "99 steps on cpu (fp32), 1.2k of 1.2M parameters trained (0.10%)",
        "evaluate": "test macro_f1 0.862, production v3 0.850",
        "merge": "merge_parity_max_abs_diff 3e-07 <= 0.0001 passed",
        "export_onnx": "onnx_parity_max_abs_diff 5e-07 <= 0.0001 passed, "
        "onnx_argmax_mismatches 0 <= 0 passed",
        "quantize": "chose dynamic_per_channel (avx2), 2.1 ms p50, accuracy 0.860 (fp32 0.870), "
        "gates passed",
        "serve_check": "served macro_f1 0.860 on CPUExecutionProvider, 1 answers",
        "register": "support v4, production kept: worse than production",
    }


def test_summary_table_has_stages_times_gates_decision_and_where_to_look(tiny_config):
    records = _records()
    for number, (name, record) in enumerate(records.items(), start=1):
        stage_started(tiny_config, name, number, len(records))
        stage_finished(name, record, seconds=float(number), reused=name == "prepare_data")
    table = summary_table({"status": "completed", "run_id": "abc123"})
    lines = table.splitlines()
    assert lines[0].split() == ["stage", "time", "result"]
    assert lines[1].startswith("prepare_data") and "earlier" in lines[1]
    assert re.match(r"train_lora +2\.0 s  99 steps", lines[2])
    assert re.match(r"total +36\.0 s$", lines[9])
    assert re.match(r"gates +ok +merge_parity_max_abs_diff +3e-07 <= 0.0001", lines[11])
    assert "decision  support v4: production kept: worse than production" in table
    look = re.search(r"look +(\S+)", table).group(1)  # the run's page in the training view
    assert re.fullmatch(
        r"http://127\.0\.0\.1:5000/#/experiments/\d+/runs/abc123\?workflowType=machine_learning",
        look,
    )
    assert f"(`make ui` or `make up` first: {tiny_config.tracking.uri})" in table
    skipped = summary_table({"status": "skipped", "reason": "nothing new to train"})
    assert skipped == "decision  skipped: nothing new to train"
    flow_console.REPORT.rows.clear()


def _cli(tmp: Path, config: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": str(tmp / "ph")}
    env.pop(VERBOSE_ENV, None)
    command = [sys.executable, "-m", "flows.cli", "run", "--config", str(config), *flags]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.mark.e2e
def test_the_demo_on_the_tiny_model_shows_no_known_noise(tmp_path, make_tiny_config):
    config = make_tiny_config(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))

    quiet = _cli(tmp_path, path)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert json.loads(quiet.stdout[quiet.stdout.index("{") :])["status"] == "completed"
    lines = quiet.stderr.splitlines()
    noisy = [line for line in lines if any(re.search(p, line) for p in NOISE)]
    assert noisy == [], "\n".join(noisy)
    steps = [line.split(" - ", 1)[-1] for line in lines if " - step " in line]
    assert steps and all(STEP_LINE.match(step) for step in steps), steps
    for stage in ("prepare_data", "train_lora", "quantize", "register"):
        assert any(f" - {stage} (" in line for line in lines), stage  # start line
        assert any(f" - {stage}: " in line for line in lines), stage  # result line
    assert any(re.match(r"stage +time +result$", line) for line in lines)
    assert any(re.match(r"total +\d+\.\d s$", line) for line in lines)
    assert any(line.startswith("decision  tiny-classifier v1: production moved") for line in lines)
    assert any(line.startswith("look      http://127.0.0.1:5000/#/experiments/") for line in lines)

    loud = _cli(tmp_path, path, "-v", "--force")
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert json.loads(loud.stdout[loud.stdout.index("{") :])["status"] == "completed"
    assert re.search(THIRD_PARTY, loud.stderr), loud.stderr[-3000:]
