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
# One more session call costs about as much work as this many padded tokens (MiniLM on a
# 2-core x86 CPU: 0.8 ms a call, 0.05 ms a token); length_batches weighs the two.
CALL_COST_TOKENS = 16


def length_batches(lengths, batch_size: int, call_cost: int = CALL_COST_TOKENS) -> list[list[int]]:
    """Positions of texts in batches of at most batch_size texts of similar length.

    A batch is padded to its longest text, so a short text batched with long ones costs as
    much as they do. The texts are sorted by length and cut into runs where the padded tokens
    plus call_cost per batch add up to the least (dynamic programming over the sorted
    lengths), so a request of mixed lengths runs as a few batches with little padding."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    ordered = lengths[order]
    best = np.zeros(len(order) + 1)
    start_of = np.zeros(len(order) + 1, dtype=np.int64)
    for end in range(1, len(order) + 1):
        starts = np.arange(max(0, end - batch_size), end)
        costs = best[starts] + call_cost + (end - starts) * ordered[end - 1]
        pick = int(np.argmin(costs))  # the first least cost: the longest batch on a tie
        best[end], start_of[end] = costs[pick], starts[pick]
    batches, end = [], len(order)
    while end > 0:
        batches.append(order[start_of[end] : end].tolist())
        end = int(start_of[end])
    return batches[::-1]


def length_grouped(tokenizer, texts: list[str], max_length: int, batch_size: int):
    """Each batch of length_batches as (positions of its texts, int64 arrays padded to its
    longest text). The texts are tokenized a chunk at a time (64 batches' worth) in one call,
    padded to the chunk's longest; each batch then takes its rows and drops the columns that
    are padding for all of them."""
    left = tokenizer.padding_side == "left"
    chunk = 64 * batch_size
    for offset in range(0, len(texts), chunk):
        encoded = tokenizer(
            list(texts[offset : offset + chunk]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="np",
        )
        lengths = encoded["attention_mask"].sum(axis=1)
        for rows in length_batches(lengths, batch_size):
            width = int(lengths[rows].max())
            columns = slice(encoded["input_ids"].shape[1] - width, None) if left else slice(width)
            arrays = {k: v[rows][:, columns].astype(np.int64) for k, v in encoded.items()}
            yield [offset + row for row in rows], arrays


def _texts(model_input) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        column = "text" if "text" in model_input.columns else model_input.columns[0]
        return [str(t) for t in model_input[column]]
    if isinstance(model_input, str):
        return [model_input]
    return [str(t) for t in model_input]


class OnnxTextClassifier(mlflow.pyfunc.PythonModel):
    """Tokenize, run the ONNX graph in batches of similar length (at most batch_size texts,
    as the pipeline evaluated it), softmax; answers in the request's order."""

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
        options = ort.SessionOptions()
        for key, value in spec.get("session_config", {}).items():
            options.add_session_config_entry(key, value)  # what the checks ran with
        self.session = ort.InferenceSession(
            str(model_dir / spec["model_file"]), options, providers=providers
        )
        self.input_names = {i.name for i in self.session.get_inputs()}

    def predict(self, context, model_input: pd.DataFrame, params=None):
        texts = _texts(model_input)
        answers = [None] * len(texts)
        batches = length_grouped(self.tokenizer, texts, self.max_length, self.batch_size)
        for positions, batch in batches:
            feed = {k: v for k, v in batch.items() if k in self.input_names}
            logits = self.session.run(["logits"], feed)[0].astype(np.float64)
            probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
            probs /= probs.sum(axis=-1, keepdims=True)
            for position, p in zip(positions, probs, strict=True):
                best = int(p.argmax())
                answers[position] = {
                    "label": self.labels[best],
                    "score": float(p[best]),
                    "probabilities": {n: float(x) for n, x in zip(self.labels, p, strict=True)},
                }
        return pd.DataFrame(answers, columns=["label", "score", "probabilities"])


mlflow.models.set_model(OnnxTextClassifier())
