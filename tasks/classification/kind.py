"""The sequence_classification task kind: text -> label (the embedded default).

Each name here is one step of tasks.interface.TaskKind; the modules beside this one hold them.
"""

from tasks.classification.data import prepare_data
from tasks.classification.evaluate import evaluate
from tasks.classification.export import export
from tasks.classification.merge import merge
from tasks.classification.quantize import quantize
from tasks.classification.serve_check import serve_check
from tasks.classification.serving import (
    SERVING_CODE,
    compare,
    golden_set,
    interval,
    serving_spec,
    signature,
    summary,
)
from tasks.classification.train import search_objective, training_setup

NAME = "sequence_classification"
WATCHED = True  # text and label columns: the data watch reads them
DESCRIPTION = (
    "LoRA-tuned text classifier (sequence_classification): a text in, a label with its score "
    "and class probabilities out; merged, exported to ONNX and quantized."
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
