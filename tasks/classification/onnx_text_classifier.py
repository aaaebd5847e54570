"""MLflow pyfunc model, logged from code: an ONNX text classifier answered by onnxruntime.

This file is copied into every registered model, so it imports nothing from this project.
Input: a table with a `text` column. Output: `label`, `score` and `probabilities` per row.
"""

import json
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort
import pandas as pd
from transformers import AutoTokenizer

SERVING_FILE = "serving.json"  # written by the register stage: labels, model file, max length


def _texts(model_input) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        column = "text" if "text" in model_input.columns else model_input.columns[0]
        return [str(t) for t in model_input[column]]
    if isinstance(model_input, str):
        return [model_input]
    return [str(t) for t in model_input]


class OnnxTextClassifier(mlflow.pyfunc.PythonModel):
    """Tokenize, run the ONNX graph, softmax; batch_size texts at a time (as evaluated)."""

    def load_context(self, context):
        self._load(Path(context.artifacts["model_dir"]))

    @classmethod
    def from_folder(cls, model_dir) -> "OnnxTextClassifier":
        """The model on a local folder, as the pipeline uses it in-process."""
        model = cls()
        model._load(Path(model_dir))
        return model

    def _load(self, model_dir: Path):
        spec = json.loads((model_dir / SERVING_FILE).read_text())
        self.labels = spec["label_names"]
        self.max_length = spec["max_length"]
        self.batch_size = spec.get("batch_size", 32)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        providers = ["CPUExecutionProvider"]
        if spec.get("device") == "cuda":
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(
            str(model_dir / spec["model_file"]), providers=providers
        )
        self.input_names = {i.name for i in self.session.get_inputs()}

    def predict(self, context, model_input: pd.DataFrame, params=None):
        texts = _texts(model_input)
        rows = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="np",
            )
            feed = {k: v.astype(np.int64) for k, v in batch.items() if k in self.input_names}
            logits = self.session.run(["logits"], feed)[0].astype(np.float64)
            probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
            probs /= probs.sum(axis=-1, keepdims=True)
            for p in probs:
                best = int(p.argmax())
                rows.append(
                    {
                        "label": self.labels[best],
                        "score": float(p[best]),
                        "probabilities": {n: float(x) for n, x in zip(self.labels, p, strict=True)},
                    }
                )
        return pd.DataFrame(rows, columns=["label", "score", "probabilities"])


mlflow.models.set_model(OnnxTextClassifier())
