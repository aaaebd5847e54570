"""Shared fixtures: a tiny random BERT with a locally built tokenizer, small data, a config."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests never write to a user's tracking server
# Planted credentials: tests/test_security.py checks none of them reaches MLflow.
PLANTED_SECRET = "PLANTED-SECRET-7f3a9c"
for _name in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_KEY"):
    os.environ[_name] = PLANTED_SECRET

ROOT = Path(__file__).resolve().parents[1]
DEMO_CSV = ROOT / "data" / "demo" / "support_tickets.csv"


def build_tiny_bert(out_dir: Path, texts: list[str]) -> Path:
    """A 2-layer BERT (hidden 32) with random weights and a WordPiece vocab from `texts`."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w for t in texts for w in re.findall(r"[a-z0-9]+|[^\sa-z0-9]", t.lower())})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.txt").write_text("\n".join(specials + words) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(out_dir / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(str(out_dir))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(specials) + len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=256,
        initializer_range=0.2,
    )  # larger than BERT's 0.02: logits that depend on the input
    BertModel(config).save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


@pytest.fixture(scope="session")
def planted_secret() -> str:
    return PLANTED_SECRET


@pytest.fixture(scope="session")
def demo_frame() -> pd.DataFrame:
    return pd.read_csv(DEMO_CSV)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, demo_frame) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), list(demo_frame["text"]))


@pytest.fixture(scope="session")
def small_csv(tmp_path_factory, demo_frame) -> Path:
    """200 demo rows, 4 classes (50 each): small enough for fast stage tests."""
    frame = demo_frame[demo_frame["label"] != "returns"].groupby("label").head(50)
    path = tmp_path_factory.mktemp("data") / "tickets.csv"
    frame.sample(frac=1.0, random_state=0).to_csv(path, index=False)
    return path


def tiny_config_dict(tmp: Path, model_dir: Path, data_path: Path) -> dict:
    """A config that runs every stage in seconds on the tiny BERT."""
    return {
        "data": {"path": str(data_path), "max_length": 64},
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        "train": {"epochs": 2, "batch_size": 16, "learning_rate": 0.01, "logging_steps": 2},
        "quantize": {
            "min_top1_agreement": 0.5,
            "max_accuracy_drop": 0.5,
            "calibration_samples": 16,
        },
        "serve": {
            "latency_runs": 5,
            "warmup_runs": 1,
            "throughput_batch_sizes": [8],
            "num_threads": 1,
            "served_model_check": False,  # one test turns it on: it starts a server (~10 s)
            "golden_requests": 16,
        },
        "registry": {"model_name": "tiny-classifier", "bootstrap_samples": 200},
        "tracking": {
            "uri": f"sqlite:///{tmp / 'mlflow.db'}",
            "experiment": "tests",
            "artifact_location": (tmp / "artifacts").as_uri(),
        },
        "output_dir": str(tmp / "outputs"),
    }


@pytest.fixture(scope="session")
def make_tiny_config(tiny_bert, small_csv):
    """Build a validated tiny config writing under a given folder (overrides merged in)."""
    from tasks.config import apply_overrides, config_from_dict

    def make(tmp: Path, overrides: list[str] = ()):
        return config_from_dict(
            apply_overrides(tiny_config_dict(tmp, tiny_bert, small_csv), list(overrides))
        )

    return make


@pytest.fixture
def tiny_config(tmp_path, make_tiny_config):
    return make_tiny_config(tmp_path)


def pytest_sessionfinish(session, exitstatus):
    """Stop Prefect's temporary server while pytest's streams are still open (quiet exit)."""
    try:
        from prefect.server.api.server import SubprocessASGIServer
    except ImportError:
        return
    for server in list(SubprocessASGIServer._instances.values()):
        server.stop()


@pytest.fixture
def run(tiny_run):
    """The session's tiny pipeline run, with MLflow pointed back at its store."""
    from tasks.tracking import connect

    connect(tiny_run.config.tracking)
    return tiny_run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, make_tiny_config):
    """Every stage once, in pipeline order, on the tiny BERT; tests read (not change) it."""
    from types import SimpleNamespace

    from tasks.evaluate import evaluate
    from tasks.export_onnx import export_onnx
    from tasks.merge import merge
    from tasks.prepare_data import prepare_data
    from tasks.quantize import quantize
    from tasks.register import register
    from tasks.serve_check import serve_check
    from tasks.tracking import start_pipeline_run
    from tasks.train_lora import train_lora

    tmp = tmp_path_factory.mktemp("pipeline")
    config = make_tiny_config(tmp)
    run_id = start_pipeline_run(config)
    out = SimpleNamespace(config=config, run_id=run_id, tmp=tmp)
    out.data = prepare_data(config, run_id)
    out.trained = train_lora(config, out.data, run_id)
    out.evaluation = evaluate(config, out.data, out.trained, run_id)
    out.merged = merge(config, out.data, out.trained, run_id)
    out.onnx = export_onnx(config, out.data, out.merged, run_id)
    out.quantized = quantize(config, out.data, out.onnx, run_id)
    out.served = serve_check(config, out.data, out.quantized, out.merged, run_id)
    out.gates = [out.merged.parity, *out.onnx.gates, *out.quantized.gates]
    out.registration = register(
        config, out.data, out.evaluation, out.quantized, out.served, out.gates, run_id
    )
    return out
