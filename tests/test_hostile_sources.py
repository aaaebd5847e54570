"""Hostile base models, stores and devices: each is a one-line error before any work is done.

Cases: a folder without tokenizer files, corrupt weights, a model of the wrong family for the
task, a tracking URI MLflow cannot use or cannot reach, an artifact store whose driver is not
installed, a device this machine lacks; and user-written labels that break MLflow's key rules.
"""

from __future__ import annotations

import importlib.util
import shutil
import time

import pandas as pd
import pytest
import torch

from tasks.common.config import DataConfig, load_config
from tasks.common.errors import ConfigError, DataError, ModelError, PipelineError
from testkit.servers import free_port

DEFAULT = "configs/default.yaml"


# ---- base models ---------------------------------------------------------------------------


def test_a_model_folder_without_tokenizer_files_is_a_model_error(tiny_config, tmp_path):
    from tasks.common.models import load_tokenizer

    folder = tmp_path / "weights-only"
    folder.mkdir()
    source = tiny_config.model.name_or_path
    for name in ("config.json", "model.safetensors"):
        shutil.copy(f"{source}/{name}", folder / name)
    model = tiny_config.model.model_copy(update={"name_or_path": str(folder)})
    with pytest.raises(ModelError) as err:
        load_tokenizer(model)
    message = str(err.value)
    assert message.startswith(f"cannot load a tokenizer from {str(folder)!r} (")
    assert message.endswith(
        "the model folder needs its tokenizer files (tokenizer.json or vocab files); save them "
        "with tokenizer.save_pretrained(folder)"
    )


def test_corrupt_weights_are_a_model_error(tiny_config, tmp_path):
    from tasks.classification.modeling import load_classifier

    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_config.model.name_or_path, folder)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(ModelError) as err:
        load_classifier(str(folder), ["a", "b"])
    message = str(err.value)
    assert message.startswith(f"cannot load model weights from {str(folder)!r}: ")
    assert message.endswith(
        "the folder needs complete *.safetensors weights (save_pretrained writes them)"
    )


def test_a_decoder_is_refused_for_classification_and_an_encoder_for_causal_lm(
    tiny_config, tmp_path
):
    from tasks.causal.modeling import check_base_model as check_causal
    from tasks.classification.modeling import check_base_model as check_classifier
    from testkit.tiny import build_tiny_decoder

    decoder = build_tiny_decoder(tmp_path / "llama", ["a few words to build a vocabulary"])
    as_decoder = tiny_config.model.model_copy(update={"name_or_path": str(decoder)})
    with pytest.raises(ConfigError) as err:
        check_classifier(as_decoder, 64)
    assert str(err.value) == (
        f"model.name_or_path {str(decoder)!r} is a decoder (LlamaForCausalLM): task "
        f"sequence_classification needs an encoder such as BERT or MiniLM; set task: causal_lm "
        f"to fine-tune a decoder"
    )
    check_causal(as_decoder, 64)
    check_classifier(tiny_config.model, 64)
    with pytest.raises(ConfigError) as err:
        check_causal(tiny_config.model, 64)
    assert str(err.value).startswith(
        f"model.name_or_path {tiny_config.model.name_or_path!r} is a 'bert' model without a "
        f"causal-LM head (BertModel): task causal_lm needs a decoder"
    )


# ---- data ----------------------------------------------------------------------------------


def test_a_semicolon_separated_file_gets_a_delimiter_hint(tmp_path):
    from tasks.classification.data import build_splits

    path = tmp_path / "tickets.csv"
    path.write_text("text;label\n" + "".join(f"row {i};a\n" for i in range(40)))
    with pytest.raises(DataError) as err:
        build_splits(DataConfig(path=str(path)))
    assert str(err.value) == (
        f"data file {path} has no column 'text', 'label'; columns found: 'text;label' (the file "
        f"looks semicolon-separated: CSV files must be comma-separated; re-save it with commas, "
        f"or as JSONL or Parquet); set data.text_column / data.label_column"
    )


def test_a_test_share_smaller_than_the_class_count_is_a_data_error(tmp_path):
    from tasks.classification.data import build_splits

    path = tmp_path / "tickets.csv"
    labels = [f"class{i % 12}" for i in range(48)]
    pd.DataFrame({"text": [f"text {i}" for i in range(48)], "label": labels}).to_csv(
        path, index=False
    )
    with pytest.raises(DataError) as err:
        build_splits(DataConfig(path=str(path), split={"test": 0.1, "validation": 0.1}))
    assert str(err.value).startswith(
        "data: cutting 10% of 48 rows leaves 5 rows on one side for 12 classes; a stratified "
        "split needs at least one row per class on each side"
    )


def test_labels_that_break_mlflow_key_rules_are_logged_under_distinct_safe_keys(tiny_config):
    from tasks.common.tracking import Tracking, metric_key, start_pipeline_run

    labels = ["refund (partial)", "refund [partial]", "x" * 300, "ok-label"]
    keys = [metric_key(f"f1.{label}") for label in labels]
    assert keys[-1] == "f1.ok-label"  # a valid key is kept as it is
    assert len(set(keys)) == len(keys) and all(len(k) <= 250 for k in keys)
    run = Tracking.connect(tiny_config.tracking).run(start_pipeline_run(tiny_config))
    run.log_metrics({f"f1.{label}": 0.5 for label in labels})
    assert set(keys) <= set(run.client.get_run(run.run_id).data.metrics)


# ---- stores --------------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["foo://somewhere", "s3://bucket/mlruns"])
def test_a_tracking_uri_mlflow_cannot_use_is_a_config_error(uri):
    from tasks.common.tracking import Tracking

    config = load_config(DEFAULT, [f"tracking.uri={uri}"])
    with pytest.raises(ConfigError) as err:
        Tracking.connect(config.tracking)
    message = str(err.value)
    assert message.startswith(f"tracking.uri {uri!r}: MLflow cannot keep runs and a model ")
    assert message.endswith(
        "use sqlite:///path.db, postgresql://..., mysql://..., http(s)://host:port"
    )


@pytest.mark.parametrize("scheme", ["http", "postgresql"])
def test_a_tracking_server_that_is_not_up_fails_fast(scheme, monkeypatch):
    from tasks.common.tracking import Tracking

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    uri = f"{scheme}://127.0.0.1:{free_port()}/db"
    config = load_config(DEFAULT, [f"tracking.uri={uri}"])
    start = time.perf_counter()
    with pytest.raises(PipelineError) as err:
        Tracking.connect(config.tracking)
    assert str(err.value) == (
        f"MLflow tracking server {uri} cannot be reached (after 2 retries): start it, or fix "
        f"tracking.uri / MLFLOW_TRACKING_URI"
    )
    # MLflow's own retries (SQLAlchemy's for PostgreSQL) would take minutes; the probe took a
    # few connection attempts. Recorded, not asserted (shared machines are noisy).
    print(f"{scheme}: refused in {time.perf_counter() - start:.1f}s")


@pytest.mark.skipif(importlib.util.find_spec("boto3") is not None, reason="boto3 is installed")
def test_an_artifact_store_without_its_driver_fails_the_run_it_started(tiny_config):
    from tasks.common.tracking import Tracking, start_pipeline_run

    config = tiny_config.model_copy(
        update={
            "tracking": tiny_config.tracking.model_copy(
                update={"artifact_location": "s3://bucket/artifacts"}
            )
        }
    )
    with pytest.raises(ConfigError) as err:
        start_pipeline_run(config)
    assert str(err.value).startswith(
        "tracking.artifact_location 's3://bucket/artifacts' needs the Python package that "
        "provides 'boto3'"
    )
    tracking = Tracking.connect(config.tracking)
    runs = tracking.client.search_runs([tracking.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]  # not left RUNNING


# ---- devices -------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_device_this_machine_lacks_is_refused_before_the_run_starts():
    from tasks.common.preflight import check_devices

    with pytest.raises(ConfigError) as err:
        check_devices(load_config(DEFAULT, ["train.device=cuda"]))
    assert str(err.value).startswith(
        "train.device is cuda but torch sees no cuda device on this machine: set train.device "
        "to auto or cpu, or send training to a GPU worker with train.deployment"
    )
    check_devices(load_config(DEFAULT, ["train.device=cuda", "train.deployment=lora-train/gpu"]))
    with pytest.raises(ConfigError, match=r"^serve.device is cuda but this onnxruntime offers "):
        check_devices(load_config(DEFAULT, ["serve.device=cuda"]))
