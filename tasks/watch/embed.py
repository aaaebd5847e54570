"""Texts as the production model sees them: the mean of its encoder's last hidden states."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer


@torch.inference_mode()
def embed(model_dir: Path, texts: list[str], max_length: int, batch_size: int = 32) -> np.ndarray:
    """One vector per text (fp32, mean over its tokens), from the merged production model."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    parts = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        parts.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, model.config.hidden_size), "float32")
