"""onnxruntime sessions for text classifiers: provider choice and batched logits."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tasks.errors import PipelineError
from tasks.modeling import encode_batches, stack

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
    """Logits for texts, batched exactly like the PyTorch path (and the served model)."""
    wanted = {i.name for i in session.get_inputs()}
    return stack(
        [
            session.run(
                ["logits"], {k: v.astype(np.int64) for k, v in batch.items() if k in wanted}
            )[0]
            for batch in encode_batches(tokenizer, texts, max_length, batch_size, tensors="np")
        ]
    )
