"""The merge stage for every task kind: safe merge, save, reload, and the parity gate.

PEFT's safe merge: each layer is merged into a copy, checked finite, then swapped in; the LoRA
wrappers are then removed. The saved folder is reloaded and must give the adapter model's
outputs (merge.parity_max_abs_diff), so what ships is what was evaluated.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from lora_core import LoraError, merge_lora, unload_lora
from tasks.common.errors import ModelError
from tasks.common.gates import Gate, require
from tasks.common.tracking import ArtifactRef


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Safe merge (in a copy, finite check, then swap in), then the LoRA wrappers out."""
    try:
        merge_lora(model, safe=True)
    except LoraError as exc:
        raise ModelError(f"merge failed: {exc}") from exc
    return unload_lora(model)  # already merged: wrappers out, merged weights stay


def merge_checked(
    stage,
    model: nn.Module,
    outputs: Callable[[nn.Module], Any],
    difference: Callable[[Any, Any], float],
    save: Callable[[nn.Module, Path], None],
    reload: Callable[[Path], nn.Module],
) -> tuple[ArtifactRef, Gate]:
    """Merge the adapter model, save it with save(model, folder), reload it and require that
    difference(reloaded outputs, adapter outputs) <= merge.parity_max_abs_diff."""
    adapter_outputs = outputs(model)
    plain = merge_and_unload(model)
    out_dir = stage.stage_dir("merged_model")
    save(plain, out_dir)
    merged_outputs = outputs(reload(out_dir))
    gate = stage.gate(
        "merge_parity_max_abs_diff",
        difference(merged_outputs, adapter_outputs),
        stage.config.merge.parity_max_abs_diff,
        "<=",
    )
    require(gate)
    return stage.run.log_folder(out_dir, "merged_model"), gate
