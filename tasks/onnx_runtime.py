"""onnxruntime sessions for text classifiers: provider choice and batched logits."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tasks.errors import PipelineError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def providers_for(device: str) -> list[str]:
    """Execution providers to request: CUDA first when asked for (or auto and available)."""
    available = ort.get_available_providers()
    if device == "cuda" or (device == "auto" and CUDA in available):
        return [CUDA, CPU]
    return [CPU]


def open_session(
    model_file: Path, device: str = "cpu", num_threads: int = 0
) -> ort.InferenceSession:
    """A session on the requested device; asking for cuda and not getting it is an error."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(model_file), options, providers=providers_for(device))
    if device == "cuda" and session.get_providers()[0] != CUDA:
        raise PipelineError(
            f"serve.device is cuda but onnxruntime runs {model_file.name} on "
            f"{session.get_providers()}: install onnxruntime-gpu with a matching CUDA, or set "
            f"serve.device to cpu"
        )
    return session


def session_logits(
    session: ort.InferenceSession,
    tokenizer,
    texts: Sequence[str],
    max_length: int,
    batch_size: int = 64,
) -> np.ndarray:
    """Logits for texts, tokenized with dynamic padding like the PyTorch path."""
    wanted = {i.name for i in session.get_inputs()}
    outputs = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="np",
        )
        feed = {k: v.astype(np.int64) for k, v in batch.items() if k in wanted}
        outputs.append(session.run(["logits"], feed)[0])
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), dtype=np.float32)
