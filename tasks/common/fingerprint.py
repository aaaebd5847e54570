"""What makes two pipeline runs the same: the data's content and the config that matters.

Runs with the same key are one piece of work (tasks/common/runs.py): a re-run continues an
unfinished one, and ends early when a finished one already registered a model.
"""

from __future__ import annotations

import hashlib
import json

from tasks.common.config import PipelineConfig
from tasks.common.datasets import content_sha256, find_split_files

IGNORED = ("tracking", "output_dir", "watch")  # where results go, and the data watch (it
# decides when to retrain), do not change what is trained


def pipeline_key(config: PipelineConfig) -> str:
    """sha256 over the data files' bytes and the config (minus where results are written)."""
    settings = config.model_dump(mode="json", exclude=set(IGNORED))
    settings["train"].pop("checkpoint_dir", None)
    digest = hashlib.sha256(content_sha256(list(find_split_files(config.data).values())).encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()
