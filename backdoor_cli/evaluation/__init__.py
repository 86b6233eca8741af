"""Evaluation: C-Acc / ASR / RA measured in large batches, their intervals, the CI gates, and the cache.

- measure: the evaluation sets and batched predictions -> EvalResult
- metrics: rates with counts and 95% Wilson intervals, DER
- gates: thresholds on the final metrics
- cache: evaluations keyed by checkpoint sha256, data, trigger, settings and version
"""

from .cache import EvalCache, data_fingerprint, eval_key, file_sha256, measured, open_cache, trigger_fingerprint
from .gates import GateResult, check_gates
from .measure import EvalResult, EvalSets, build_eval_sets, evaluate_model
from .metrics import Rate, defense_effectiveness_rating

__all__ = [
    "EvalCache",
    "EvalResult",
    "EvalSets",
    "GateResult",
    "Rate",
    "build_eval_sets",
    "check_gates",
    "data_fingerprint",
    "defense_effectiveness_rating",
    "eval_key",
    "evaluate_model",
    "file_sha256",
    "measured",
    "open_cache",
    "trigger_fingerprint",
]
