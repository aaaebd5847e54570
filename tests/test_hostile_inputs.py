"""Inputs a hostile user tries: every one works as documented or is refused with the fix."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.classification.data import build_splits, check_labels
from tasks.common.champion import metric_rows, paired_bootstrap
from tasks.common.config import DataConfig, load_config
from tasks.common.errors import ConfigError, DataError

DEFAULT = "configs/default.yaml"


def _config_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT, list(overrides))
    return str(err.value)


# ---- config: values that did nothing, hung, or failed deep inside a library ----------------


def test_a_key_given_twice_is_an_error_with_its_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  path: a.csv\ntrain:\n  epochs: 2\ntrain:\n  epochs: 9\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"config file {path}: key 'train' is given twice in one section (lines 3 and 5); YAML "
        f"would keep only the last one: remove one of them"
    )


def test_split_shares_must_leave_training_rows():
    assert _config_error("data.split.validation=0.5", "data.split.test=0.5").endswith(
        ": data.split: validation 0.5 + test 0.5 leaves 0% of the rows for training; keep their "
        "sum at 0.9 or less (e.g. validation 0.1, test 0.2)"
    )


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("data.seed=-1", " data.seed: Input should be greater than or equal to 0 (got -1)"),
        ("train.seed=4294967296", " train.seed: Input should be less than 4294967296"),
        ("data.max_length=1", " data.max_length: Input should be greater than or equal to 8"),
        (
            "registry.bootstrap_samples=100000000",
            " registry.bootstrap_samples: Input should be less than or equal to 100000",
        ),
        ("serve.latency_runs=1000000000", " serve.latency_runs: Input should be less than"),
        ("export.opset=99", " export.opset: Input should be less than or equal to 23"),
        (
            "registry.model_name=it's",
            " registry.model_name: \"it's\" is not allowed: use letters, digits, '.', '_' and "
            "'-', starting with a letter or digit",
        ),
        (
            "data.label_column=text",
            " data.text_column and data.label_column are both 'text': name two different columns",
        ),
    ],
)
def test_values_that_cannot_work_are_refused_up_front(override, line):
    assert line in _config_error(override)


def test_a_setting_of_another_task_is_refused_unless_it_repeats_the_default(tmp_path):
    import yaml

    causal = "configs/causal_lm.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(causal, ["data.text_column=body"])
    assert str(err.value).endswith(
        ": data.text_column is not used by task causal_lm (settings of another task): remove it"
    )
    with pytest.raises(ConfigError) as err:  # static calibration: classification only
        load_config(causal, ["quantize.calibration_method=entropy"])
    assert str(err.value).endswith(
        ": quantize.calibration_method is not used by task causal_lm "
        "(settings of another task): remove it"
    )
    dumped = tmp_path / "resolved.yaml"  # what every run logs as config/resolved.yaml
    dumped.write_text(yaml.safe_dump(load_config(causal).model_dump(mode="json")))
    assert load_config(dumped) == load_config(causal)


def test_max_length_beyond_the_models_positions_is_refused(tiny_config):
    from tasks.common.models import check_max_length

    check_max_length(tiny_config.model, 256)  # the tiny BERT has 256 positions
    with pytest.raises(ConfigError) as err:
        check_max_length(tiny_config.model, 257)
    assert str(err.value) == (
        f"data.max_length 257 is more than the 256 positions the base model "
        f"{tiny_config.model.name_or_path!r} has: set data.max_length to 256 or less"
    )


def test_the_bootstrap_is_vectorised_and_equals_the_per_resample_loop():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 120)
    candidate = np.where(rng.random(120) < 0.8, y, (y + 1) % 4)
    production = np.where(rng.random(120) < 0.7, y, -1)  # -1: a label the model does not know
    fast = paired_bootstrap("macro_f1", y, candidate, production, 4, samples=500, seed=7)
    draws = np.random.default_rng(7).integers(0, 120, (500, 120))
    slow = [
        metric_rows("macro_f1", y[i][None], candidate[i][None], 4)[0]
        - metric_rows("macro_f1", y[i][None], production[i][None], 4)[0]
        for i in draws
    ]
    assert fast.low == pytest.approx(np.percentile(slow, 2.5))
    assert fast.high == pytest.approx(np.percentile(slow, 97.5))
    big = paired_bootstrap("macro_f1", y, candidate, production, 4, samples=100_000)
    assert big.low <= big.delta <= big.high  # the largest allowed count, in bounded memory


# ---- labels are read as written -----------------------------------------------------------


def _write(path, texts, labels):
    pd.DataFrame({"text": texts, "label": labels}).to_csv(path, index=False)
    return path


def _texts(n, tag):
    return [f"{tag} message number {i} about things" for i in range(n)]


def test_labels_differing_only_in_case_or_spacing_are_an_error(tmp_path):
    path = _write(
        tmp_path / "d.csv",
        _texts(60, "x"),
        ["billing"] * 20
        + ["Billing"] * 2
        + ["shipping"] * 19
        + ["ship ping", "a", "a"]
        + ["a"] * 16,
    )
    with pytest.raises(DataError) as err:
        build_splits(DataConfig(path=str(path)))
    assert str(err.value) == (
        "data: labels 'Billing' (2 rows) and 'billing' (20 rows); 'ship ping' (1 rows) and "
        f"'shipping' (19 rows) differ only in letter case or spacing ({path}); they would "
        "become separate classes: write each class the same way in every row"
    )


def test_words_that_look_missing_are_labels_and_blanks_are_missing(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(
        "text,label\n"
        + "".join(f"text {i},{label}\n" for i, label in enumerate(["None", "NA", "null"] * 10))
        + "blank label row,\n"
    )
    splits, dropped, _ = build_splits(DataConfig(path=str(path)))
    assert check_labels(splits) == ["NA", "None", "null"]
    assert dropped["missing_label"] == 1


def test_integer_labels_with_a_blank_stay_the_integers_written(tmp_path):
    path = tmp_path / "d.csv"
    rows = "".join(f"text {i},{i % 2 + 1}\n" for i in range(30))
    path.write_text("text,label\n" + rows + "one without a label,\n")
    splits, dropped, _ = build_splits(DataConfig(path=str(path)))
    assert check_labels(splits) == ["1", "2"] and dropped["missing_label"] == 1
    jsonl = tmp_path / "d.jsonl"
    records = [{"text": f"t{i}", "label": i % 2 + 1} for i in range(30)]
    jsonl.write_text("\n".join(json.dumps(r) for r in [*records, {"text": "x", "label": None}]))
    splits, dropped, _ = build_splits(DataConfig(path=str(jsonl)))
    assert check_labels(splits) == ["1", "2"] and dropped["missing_label"] == 1


@pytest.mark.parametrize(
    ("column", "kind"),
    [(pa.array(list(range(30)), pa.int64()), "int64"), (pa.array([["a", "b"]] * 30), "list")],
)
def test_a_text_column_that_is_not_text_is_an_error(tmp_path, column, kind):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": column, "label": ["a", "b", "c"] * 10}), path)
    with pytest.raises(DataError) as err:
        build_splits(DataConfig(path=str(path)))
    assert str(err.value) == (
        f"data file {path}: column 'text' holds {kind} values, not text; convert the texts to "
        "strings, or set data.text_column to the column that holds them"
    )


def test_a_header_with_a_repeated_column_is_an_error(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label,text\nhello,a,again\n")
    with pytest.raises(DataError) as err:
        build_splits(DataConfig(path=str(path)))
    assert str(err.value) == (
        f"data file {path}: column 'text' appears more than once in the header; give every "
        "column its own name"
    )


# ---- faults found late before: now checked before the work starts --------------------------


def test_only_transient_faults_are_retried():
    import sqlite3

    from mlflow.exceptions import MlflowException

    from tasks.common.errors import GateFailed, is_transient

    assert is_transient(ConnectionRefusedError(111, "Connection refused"))
    assert is_transient(MlflowException("API request to x failed: Max retries exceeded"))
    assert is_transient(sqlite3.OperationalError("database is locked"))
    wrapped = RuntimeError("upload failed")
    wrapped.__cause__ = TimeoutError()
    assert is_transient(wrapped)
    assert not is_transient(ValueError("bad value"))
    assert not is_transient(KeyError("label"))
    assert not is_transient(MlflowException("RESOURCE_ALREADY_EXISTS: model exists"))
    assert not is_transient(DataError("bad data: Connection refused in a text"))  # user error
    from tasks.common.gates import evaluate_gate

    assert not is_transient(GateFailed(evaluate_gate("g", 1.0, 0.0, "<=")))


def test_no_validation_split_trains_without_per_epoch_evaluation(make_tiny_config, tmp_path):
    from tasks.common.tracking import Tracking, start_pipeline_run
    from tasks.stages import prepare_data, train_lora

    config = make_tiny_config(tmp_path, ["data.split.validation=0", "train.epochs=1"])
    run_id = start_pipeline_run(config)
    data = prepare_data(config, run_id)
    assert set(data.rows) == {"train", "test"}
    trained = train_lora(config, data, run_id)
    assert trained.global_steps > 0
    client = Tracking.connect(config.tracking).client
    assert client.get_metric_history(run_id, "eval/accuracy") == []


@pytest.mark.parametrize(
    ("override", "setting", "stage"),
    [
        ("train.checkpoint_dir={blocked}/checkpoints", "train.checkpoint_dir", "train"),
        (
            "tracking.artifact_location=file://{blocked}/artifacts",
            "tracking.artifact_location",
            "tracking",
        ),
    ],
)
def test_an_unwritable_checkpoint_or_artifact_folder_is_found_before_any_work(
    make_tiny_config, tmp_path, override, setting, stage
):
    from tasks.common.errors import PipelineError
    from tasks.common.tracking import Tracking, start_pipeline_run
    from tasks.stages import prepare_data, train_lora

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    config = make_tiny_config(tmp_path / "run", [override.format(blocked=blocked)])
    with pytest.raises(PipelineError) as err:
        run_id = start_pipeline_run(config)
        data = prepare_data(config, run_id)
        train_lora(config, data, run_id)
    message = str(err.value)
    assert message.startswith(f"{stage}: output folder {blocked}/")
    assert message.endswith(f"set {setting} to a folder you can write to")
    if stage == "train":
        client = Tracking.connect(config.tracking).client
        assert client.get_metric_history(run_id, "train/loss") == []  # no step was taken
