"""Errors the pipeline raises for bad input. The CLI prints their message and exits non-zero."""


class PipelineError(Exception):
    """A problem the user can fix; the message says what, where and how."""


class ConfigError(PipelineError, ValueError):
    """The config file or an override is invalid."""


class DataError(PipelineError, ValueError):
    """The dataset cannot be used as given."""


class ModelError(PipelineError, ValueError):
    """The base model or adapter cannot be loaded."""


class TrainingError(PipelineError):
    """Training cannot go on (e.g. the loss became NaN or infinite)."""


class GateFailed(PipelineError):
    """A quality gate stopped the run; its record is attached."""

    def __init__(self, gate):
        self.gate = gate
        super().__init__(gate.describe())


def retry_unless_user_error(task, task_run, state) -> bool:
    """Prefect retry condition: retry transient failures, never a bad input or a failed gate."""
    try:
        state.result()
    except PipelineError:
        return False
    except Exception:  # noqa: BLE001 - anything else (network, disk) may pass on retry
        return True
    return False
