"""Task metrics, as pure functions of predictions and references.

Which metrics a dataset reports is data: ``dataset.json`` lists them in ``metrics`` (see
:class:`phi3v_data.schema.DatasetInfo`); ``phi3v-train eval --metrics`` overrides the list.

| name | definition | used for |
|---|---|---|
| ``accuracy`` | exact match after ``strip()``, ``strip('.')``, ``lower()`` of prediction and each reference; any reference may match | UCF-101, NLVR2, Hateful Memes |
| ``anls`` | Average Normalized Levenshtein Similarity, tau = 0.5, best over all references | DocVQA |
| ``auroc`` | ROC AUC of P(positive answer word at the first answer position) against ``label`` | Hateful Memes |
| ``consistency`` | fraction of ``group`` keys whose examples are all correct (exact match) | NLVR2 |

``auroc`` and ``consistency`` are always reported together with ``accuracy``
(:func:`resolve_metric_names`), as the original datasets publish them.

ANLS follows the official definition (ST-VQA, Biten et al. 2019, adopted by DocVQA; reference
implementation shunk031/ANLS): both strings are trimmed, lower-cased and have runs of whitespace
collapsed to one space; NL = Levenshtein / max length; a reference scores ``1 - NL`` when
``NL < tau`` and 0 otherwise (so NL exactly 0.5 scores 0); the best reference counts; the mean is
taken over questions; two empty strings score 1. The original cookbook's DocVQA script differs:
it does **not** lower-case (case-sensitive), strips '.' characters from the prediction only and
does not collapse whitespace, and it scores an empty prediction 0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import get_args

from rapidfuzz.distance import Levenshtein

from phi3v_data.schema import DatasetInfo

#: Every metric name a dataset may list (taken from the schema, declared there once).
METRIC_NAMES: tuple[str, ...] = get_args(
    get_args(DatasetInfo.model_fields["metrics"].annotation)[0]
)

#: ANLS threshold: a reference at normalised distance >= ANLS_TAU scores 0.
ANLS_TAU = 0.5

_WHITESPACE_RUN = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Exact-match normalisation of the original recipe: strip, strip '.', lower-case."""
    return text.strip().strip(".").lower()


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference, else 0.0."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(reference) for reference in references))


def accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean :func:`exact_match` over examples."""
    _check_lengths(predictions, references)
    return _mean(exact_match(p, r) for p, r in zip(predictions, references, strict=True))


def normalize_anls(text: str) -> str:
    """ANLS normalisation (official): trim, lower-case, collapse whitespace runs to one space."""
    return _WHITESPACE_RUN.sub(" ", text.strip()).lower()


def normalized_levenshtein(a: str, b: str) -> float:
    """Levenshtein distance divided by the longer length; 0.0 for two empty strings."""
    longest = max(len(a), len(b))
    if longest == 0:
        return 0.0
    return Levenshtein.distance(a, b) / longest


def anls_score(prediction: str, references: Sequence[str], tau: float = ANLS_TAU) -> float:
    """Best similarity of one prediction over its references: ``1 - NL`` if ``NL < tau``, else 0."""
    predicted = normalize_anls(prediction)
    best = 0.0
    for reference in references:
        distance = normalized_levenshtein(normalize_anls(reference), predicted)
        if distance < tau:
            best = max(best, 1.0 - distance)
    return best


def anls(
    predictions: Sequence[str], references: Sequence[Sequence[str]], tau: float = ANLS_TAU
) -> float:
    """Average Normalized Levenshtein Similarity over questions (mean of :func:`anls_score`)."""
    _check_lengths(predictions, references)
    return _mean(anls_score(p, r, tau) for p, r in zip(predictions, references, strict=True))


def auroc(labels: Sequence[int], positive_scores: Sequence[float]) -> float:
    """ROC AUC (scikit-learn) of the scores of class 1; NaN when only one class is present."""
    _check_lengths(labels, positive_scores)
    if len(set(labels)) < 2:
        return math.nan
    from sklearn.metrics import roc_auc_score  # 2 s to import: only when AUROC is asked for

    return float(roc_auc_score(list(labels), list(positive_scores)))


def consistency(groups: Sequence[str], correct: Sequence[float | bool]) -> float:
    """Fraction of groups whose examples are all correct (NLVR2: examples sharing a sentence)."""
    _check_lengths(groups, correct)
    all_correct: dict[str, bool] = {}
    for group, is_correct in zip(groups, correct, strict=True):
        all_correct[group] = all_correct.get(group, True) and bool(is_correct)
    return _mean(float(value) for value in all_correct.values())


def resolve_metric_names(names: Iterable[str]) -> list[str]:
    """Validate metric names and add ``accuracy`` where ``auroc`` or ``consistency`` needs it.

    Order is kept; unknown names raise ``ValueError`` naming the allowed ones.
    """
    resolved: list[str] = []
    for name in names:
        if name not in METRIC_NAMES:
            raise ValueError(f"unknown metric {name!r} (choose from {', '.join(METRIC_NAMES)})")
        if name in ("auroc", "consistency") and "accuracy" not in resolved:
            resolved.append("accuracy")
        if name not in resolved:
            resolved.append(name)
    return resolved


def _check_lengths(first: Sequence[object], second: Sequence[object]) -> None:
    if len(first) != len(second):
        raise ValueError(f"length mismatch: {len(first)} predictions vs {len(second)} references")


def _mean(values: Iterable[float]) -> float:
    items = list(values)
    return sum(items) / len(items) if items else math.nan
