"""Gates: checks that can stop a model. Each is a record of name, value, threshold and verdict."""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass
from typing import Literal

from tasks.common.errors import GateFailed

Comparison = Literal["<=", ">=", "=="]
_OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq}


@dataclass(frozen=True)
class Gate:
    """One check: `value <comparison> threshold` must hold. NaN never passes."""

    name: str
    value: float
    threshold: float
    comparison: Comparison
    passed: bool

    def describe(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"gate {self.name} {verdict}: measured {self.value:.6g}, "
            f"required {self.comparison} {self.threshold:.6g}"
        )

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate_gate(name: str, value: float, threshold: float, comparison: Comparison) -> Gate:
    """Build a Gate record; NaN or infinite values fail."""
    value = float(value)
    passed = math.isfinite(value) and bool(_OPS[comparison](value, threshold))
    return Gate(
        name=name, value=value, threshold=float(threshold), comparison=comparison, passed=passed
    )


def require(gate: Gate) -> Gate:
    """Raise GateFailed unless the gate passed (a gate never degrades to a warning)."""
    if not gate.passed:
        raise GateFailed(gate)
    return gate
