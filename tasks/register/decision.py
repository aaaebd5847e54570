"""Whether production moves: every gate passed, and the candidate is not worse than production.

The champion gate is the lower end of the paired-bootstrap confidence interval of candidate
minus production (registry.metric, same examples): it must be >= -registry.tolerance.
"""

from __future__ import annotations

from tasks.common.champion import Comparison
from tasks.common.config import RegistryConfig
from tasks.common.gates import Gate, evaluate_gate

COMPARABLE_GATE = "champion_comparable_with_production"


def champion_gate(
    registry: RegistryConfig, comparison: Comparison | None, refusal: str | None = None
) -> Gate | None:
    """The champion gate; a failed `champion_comparable_with_production` when production
    cannot be compared with (refusal), None without a production model."""
    if refusal is not None:
        return evaluate_gate(COMPARABLE_GATE, 0.0, 1.0, ">=")
    if comparison is None:
        return None
    return evaluate_gate(
        f"champion_{registry.metric}_delta_ci_low", comparison.low, 0.0 - registry.tolerance, ">="
    )


def decide(
    registry: RegistryConfig, gates: list[Gate], champion: Gate | None, refusal: str | None = None
) -> tuple[bool, str]:
    """(promote, reason): failed gates first, then the champion, then registry.promote."""
    failed = [g.name for g in gates if not g.passed]
    if failed:
        return False, f"gates failed: {', '.join(failed)}"
    if refusal is not None:
        return False, f"cannot compare with production: {refusal}"
    if champion is not None and not champion.passed:
        return False, f"candidate trails production: {champion.describe()}"
    if not registry.promote:
        return False, "registry.promote is false"
    if champion is None:
        return True, "no production model yet; every gate passed"
    return True, f"every gate passed; {champion.describe()}"
