"""The causal_lm task kind: prompt or chat -> response (instruction tuning of decoders).

Each name here is one step of tasks.interface.TaskKind; the modules beside this one hold them.
"""

from tasks.causal.data import prepare_data
from tasks.causal.evaluate import evaluate
from tasks.causal.export import export
from tasks.causal.merge import merge
from tasks.causal.quantize import quantize
from tasks.causal.serve_check import serve_check
from tasks.causal.serving import (
    SERVING_CODE,
    compare,
    golden_set,
    interval,
    serving_spec,
    signature,
    summary,
)
from tasks.causal.train import search_objective, training_setup

NAME = "causal_lm"
WATCHED = False  # no labels, and the prepared data keeps no prompt texts to compare
DESCRIPTION = (
    "LoRA-tuned chat decoder (causal_lm): a prompt or a conversation in, a greedy answer out; "
    "merged, exported to ONNX with a KV cache and quantized."
)

__all__ = [
    "DESCRIPTION",
    "NAME",
    "SERVING_CODE",
    "WATCHED",
    "compare",
    "evaluate",
    "export",
    "golden_set",
    "interval",
    "merge",
    "prepare_data",
    "quantize",
    "search_objective",
    "serve_check",
    "serving_spec",
    "signature",
    "summary",
    "training_setup",
]
