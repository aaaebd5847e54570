"""The folder a registered model serves from: the chosen ONNX file, tokenizer, serving.json.

serving.json tells the pyfunc in tasks/serving/ how to answer: for sequence_classification the
label names, max length and batch size the gates measured; for causal_lm the default number of
new tokens. Both record the ONNX file, the variant and the device.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tasks.config import PipelineConfig
from tasks.prepare_data import PreparedData
from tasks.quantize import SERVED_FILE, QuantizedModel
from tasks.storage import stage_dir

SERVING_DIR = Path(__file__).resolve().parent / "serving"
SERVING_CODE = {
    "sequence_classification": SERVING_DIR / "onnx_text_classifier.py",
    "causal_lm": SERVING_DIR / "onnx_causal_lm.py",
}


def serving_spec(config: PipelineConfig, data: PreparedData, variant: str) -> dict:
    spec = {
        "task": config.task,
        "model_file": SERVED_FILE,
        "variant": variant,
        "device": "cuda" if config.serve.device == "cuda" else "cpu",
    }
    if config.task == "causal_lm":
        return spec | {"max_new_tokens": config.eval.max_new_tokens}
    return spec | {
        "label_names": data.label_names,
        "max_length": config.data.max_length,
        # dynamic int8 scales depend on the batch: serve with the batching the gates measured
        "batch_size": config.eval.batch_size,
    }


def build_serving_folder(
    config: PipelineConfig, data: PreparedData, quantized: QuantizedModel, run_id: str
) -> Path:
    """Copy the served ONNX file with its tokenizer and config files; write serving.json."""
    src = quantized.model.fetch()
    out_dir = stage_dir(config, run_id, "serving_model")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for item in src.iterdir():
        if item.is_file() and (item.suffix != ".onnx" or item.name == SERVED_FILE):
            shutil.copy2(item, out_dir / item.name)
    spec = serving_spec(config, data, quantized.variant)
    (out_dir / "serving.json").write_text(json.dumps(spec, indent=2))
    return out_dir
