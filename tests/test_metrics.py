"""Metric functions against hand-computed values."""

from __future__ import annotations

import math

import pytest

from phi3v_train.evaluation import metrics


@pytest.mark.parametrize(
    ("prediction", "references", "expected"),
    [
        ("Archery", ["Archery"], 1.0),
        (" Archery.\n", ["archery"], 1.0),  # strip, strip('.'), lower on the prediction
        ("yes", ["Yes."], 1.0),  # ... and on the reference
        ("..yes..", ["yes"], 1.0),
        ("no", ["yes"], 0.0),
        ("yes, it is", ["yes"], 0.0),  # exact match, not containment
        ("b", ["a", "B"], 1.0),  # any reference may match
        (". yes", ["yes"], 0.0),  # strip('.') runs after strip(): the inner space stays
    ],
)
def test_exact_match(prediction: str, references: list[str], expected: float) -> None:
    assert metrics.exact_match(prediction, references) == expected


def test_accuracy_mean_and_length_check() -> None:
    assert metrics.accuracy(["a", "b", "c", "d"], [["a"], ["x"], ["C."], ["d"]]) == 0.75
    with pytest.raises(ValueError, match="length mismatch"):
        metrics.accuracy(["a"], [["a"], ["b"]])
    assert math.isnan(metrics.accuracy([], []))


@pytest.mark.parametrize(
    ("prediction", "references", "expected"),
    [
        ("1/8/93", ["1/8/93"], 1.0),
        # datasets.md cases: 'p carter' vs 'p. carter' is 1 edit over 9 characters
        ("p carter", ["P. Carter", "p. carter"], 8 / 9),
        ("CocaCola", ["Coca Cola"], 8 / 9),
        # case-insensitive, surrounding and repeated whitespace do not count
        ("  COCA   cola ", ["coca cola"], 1.0),
        # right at the threshold: NL = 1/2 and 2/4 are NOT below tau = 0.5 -> 0
        ("ab", ["ac"], 0.0),
        ("abxy", ["abcd"], 0.0),
        # just below the threshold: NL = 2/5 -> 1 - 0.4
        ("abcxy", ["abcde"], 0.6),
        # just above: NL = 2/3 -> 0
        ("axy", ["abc"], 0.0),
        # best over references: 0 (NL = 1) and 1 - 1/4
        ("abcd", ["zzzz", "abce"], 0.75),
        ("", ["abc"], 0.0),
        ("", [""], 1.0),  # both empty: NL defined as 0
        # no punctuation stripping: 'univ.' vs 'univ' is one edit over 5 characters
        ("univ.", ["univ"], 0.8),
    ],
)
def test_anls_score(prediction: str, references: list[str], expected: float) -> None:
    assert metrics.anls_score(prediction, references) == pytest.approx(expected)


def test_anls_tau_is_a_parameter() -> None:
    assert metrics.anls_score("ab", ["ac"], tau=0.51) == pytest.approx(0.5)


def test_anls_is_the_mean_over_questions() -> None:
    predictions = ["1/8/93", "axy", "abcxy"]
    references = [["1/8/93"], ["abc"], ["abcde", "q"]]
    assert metrics.anls(predictions, references) == pytest.approx((1.0 + 0.0 + 0.6) / 3)


def test_normalized_levenshtein_uses_the_longer_length() -> None:
    assert metrics.normalized_levenshtein("kitten", "sitting") == pytest.approx(3 / 7)
    assert metrics.normalized_levenshtein("", "") == 0.0


def test_auroc_against_known_rankings() -> None:
    # positives at 0.35 and 0.8, negatives at 0.1 and 0.4: 3 of 4 pairs ordered correctly
    assert metrics.auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert metrics.auroc([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]) == 1.0
    assert metrics.auroc([0, 1, 0, 1], [0.9, 0.1, 0.8, 0.2]) == 0.0
    assert metrics.auroc([0, 1], [0.5, 0.5]) == 0.5  # ties count half
    assert math.isnan(metrics.auroc([1, 1], [0.2, 0.3]))  # undefined with one class


def test_consistency_over_groups() -> None:
    groups = ["dev-1--0", "dev-1--0", "dev-2--1", "dev-2--1", "dev-3--0"]
    correct = [1.0, 1.0, 1.0, 0.0, 1.0]
    # group 1 all right, group 2 has a miss, group 3 (a single example) right
    assert metrics.consistency(groups, correct) == pytest.approx(2 / 3)
    assert metrics.consistency(["g"] * 3, [True, True, True]) == 1.0
    assert metrics.consistency(["g", "h"], [False, False]) == 0.0


def test_resolve_metric_names() -> None:
    assert metrics.resolve_metric_names(["anls"]) == ["anls"]
    assert metrics.resolve_metric_names(["auroc"]) == ["accuracy", "auroc"]
    assert metrics.resolve_metric_names(["consistency", "accuracy"]) == [
        "accuracy",
        "consistency",
    ]
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        metrics.resolve_metric_names(["bleu"])
    assert set(metrics.METRIC_NAMES) == {"accuracy", "anls", "auroc", "consistency"}
