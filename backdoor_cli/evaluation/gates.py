"""CI gates: thresholds on the final metrics. A failed gate still writes every output, then exits 1."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GateResult:
    name: str  # e.g. "max-asr"
    threshold: float
    value: float
    passed: bool

    def describe(self) -> str:
        if self.name == "require-verified":
            return f"gate require-verified {'passed' if self.passed else 'FAILED'}: the removal verdict " + (
                "is verified" if self.passed else "is not verified"
            )
        op = "<=" if self.name.startswith("max") else ">="
        verdict = "passed" if self.passed else "FAILED"
        return f"gate {self.name} {verdict}: {self.value:.2%} (must be {op} {self.threshold:.2%})"

    def to_dict(self) -> dict:
        return {"gate": self.name, "threshold": self.threshold, "value": self.value, "passed": self.passed}


def check_gates(
    asr: float | None,
    acc: float,
    acc_drop: float | None = None,
    max_asr: float | None = None,
    min_acc: float | None = None,
    max_acc_drop: float | None = None,
) -> list[GateResult]:
    """Compare the measured rates (fractions) with the thresholds that were given."""
    gates = []
    if max_asr is not None and asr is not None:
        gates.append(GateResult("max-asr", max_asr, asr, asr <= max_asr))
    if min_acc is not None:
        gates.append(GateResult("min-acc", min_acc, acc, acc >= min_acc))
    if max_acc_drop is not None and acc_drop is not None:
        gates.append(GateResult("max-acc-drop", max_acc_drop, acc_drop, acc_drop <= max_acc_drop))
    return gates


def all_passed(gates: list[GateResult]) -> bool:
    return all(g.passed for g in gates)
