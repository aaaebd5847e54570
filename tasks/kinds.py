"""The registry of task kinds: config.task -> the kind that runs every stage for it.

This is the one place that knows which kinds exist; a new kind is a folder under tasks/ with a
kind.py implementing tasks.interface.TaskKind, plus one line here.
"""

from __future__ import annotations

from tasks.causal import kind as causal
from tasks.classification import kind as classification
from tasks.common.config import PipelineConfig
from tasks.interface import TaskKind

KINDS: dict[str, TaskKind] = {kind.NAME: kind for kind in (classification, causal)}


def kind_of(config: PipelineConfig) -> TaskKind:
    """The task kind config.task names (the config schema allows only registered ones)."""
    return KINDS[config.task]
