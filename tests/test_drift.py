"""Drift statistics (tasks/common/drift.py): calibrated with no drift, powerful under shifts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.spatial.distance import pdist

from tasks.common.drift import DriftTest, label_balance_test, length_test, mmd_test

ALPHA = 0.05
NULL_SEEDS = 40
MAX_FALSE_ALARMS = 6  # expected 2 of 40 at alpha 0.05; 7 or more has probability < 1%
POWER_SEEDS = 10
LABELS = ["a", "b", "c", "d"]


def _label_counts(rng: np.random.Generator, shares: list[float], n: int) -> dict[str, int]:
    return dict(zip(LABELS, (int(c) for c in rng.multinomial(n, shares)), strict=True))


def _lengths(rng: np.random.Generator, n: int, scale: float = 1.0) -> np.ndarray:
    return np.round(scale * rng.lognormal(mean=np.log(90.0), sigma=0.35, size=n))


def _naive_mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """Unbiased MMD^2 by definition, pair by pair."""

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.exp(-np.sum((a - b) ** 2) / (2 * bandwidth**2)))

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


# -- calibration: same distribution, few false alarms ------------------------------------------


def test_label_balance_false_alarms_are_rare():
    alarms = 0
    for seed in range(NULL_SEEDS):
        rng = np.random.default_rng(seed)
        shares = [0.4, 0.3, 0.2, 0.1]
        result = label_balance_test(
            _label_counts(rng, shares, 400), _label_counts(rng, shares, 400), ALPHA
        )
        alarms += result.drifted
    assert alarms <= MAX_FALSE_ALARMS


def test_length_false_alarms_are_rare():
    alarms = 0
    for seed in range(NULL_SEEDS):
        rng = np.random.default_rng(seed)
        alarms += length_test(_lengths(rng, 200), _lengths(rng, 200), ALPHA).drifted
    assert alarms <= MAX_FALSE_ALARMS


def test_mmd_false_alarms_are_rare():
    alarms = 0
    for seed in range(NULL_SEEDS):
        rng = np.random.default_rng(seed)
        reference, current = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
        alarms += mmd_test(reference, current, ALPHA, permutations=200, seed=seed).drifted
    assert alarms <= MAX_FALSE_ALARMS


# -- power: real shifts are found every time ----------------------------------------------------


@pytest.mark.parametrize("seed", range(POWER_SEEDS))
def test_label_shift_is_detected(seed):
    rng = np.random.default_rng(seed)
    reference = _label_counts(rng, [0.25, 0.25, 0.25, 0.25], 400)
    current = _label_counts(rng, [0.55, 0.15, 0.15, 0.15], 400)
    assert label_balance_test(reference, current, ALPHA).drifted


@pytest.mark.parametrize("seed", range(POWER_SEEDS))
def test_length_shift_is_detected(seed):
    rng = np.random.default_rng(seed)
    assert length_test(_lengths(rng, 200), _lengths(rng, 200, scale=1.5), ALPHA).drifted


@pytest.mark.parametrize("seed", range(POWER_SEEDS))
def test_embedding_mean_shift_is_detected(seed):
    rng = np.random.default_rng(seed)
    reference, current = rng.normal(size=(200, 16)), rng.normal(loc=0.5, size=(200, 16))
    result = mmd_test(reference, current, ALPHA, permutations=200, seed=seed)
    assert result.drifted
    assert result.p_value == pytest.approx(1 / 201)  # no permutation comes near


@pytest.mark.parametrize("seed", range(POWER_SEEDS))
def test_embedding_topic_shift_is_detected(seed):
    """The current sample draws 40% of its rows from a cluster the reference has 2% of."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4, 16))

    def sample(weights: list[float]) -> np.ndarray:
        topics = rng.choice(4, size=200, p=weights)
        return centers[topics] + rng.normal(scale=1.0, size=(200, 16))

    reference, current = sample([0.34, 0.32, 0.32, 0.02]), sample([0.2, 0.2, 0.2, 0.4])
    assert mmd_test(reference, current, ALPHA, permutations=200, seed=seed).drifted


def test_new_label_only_in_current_is_detected():
    reference = {"billing": 100, "shipping": 100}
    current = {"billing": 80, "shipping": 80, "refunds": 40}
    result = label_balance_test(reference, current, ALPHA)
    assert result.drifted
    assert result.detail["new_labels"] == ["refunds"]
    assert result.detail["reference_share"]["refunds"] == 0.0
    assert result.detail["current_share"]["refunds"] == pytest.approx(0.2)
    assert result.detail["dof"] == 2


# -- the numbers themselves ---------------------------------------------------------------------


def test_chi_square_matches_hand_computation_and_ignores_empty_labels():
    # table [[30, 10], [20, 20]]: expected [[25, 15], [25, 15]]
    expected_stat = 2 * (25 / 25 + 25 / 15)
    result = label_balance_test({"x": 30, "y": 10, "z": 0}, {"x": 20, "y": 20, "z": 0}, ALPHA)
    assert result.statistic == pytest.approx(expected_stat)  # no Yates correction
    assert result.detail["labels"] == ["x", "y"]
    assert result.detail["dof"] == 1
    assert result.detail["n_reference"] == 40 and result.detail["n_current"] == 40
    assert result.detail["reference_share"] == {"x": 0.75, "y": 0.25}


def test_identical_label_counts_give_p_near_one():
    counts = {"a": 120, "b": 80, "c": 40}
    result = label_balance_test(counts, dict(counts), ALPHA)
    assert result.statistic == pytest.approx(0.0, abs=1e-12)
    assert result.p_value == pytest.approx(1.0)
    assert not result.drifted


def test_length_detail_and_statistic():
    reference, current = [10, 20, 30, 40], [50, 60, 70, 80, 90]
    result = length_test(reference, current, ALPHA)
    assert result.name == "text_length"
    assert result.statistic == pytest.approx(1.0)  # the samples do not overlap
    assert result.detail["mean_reference"] == 25.0 and result.detail["median_current"] == 70.0
    assert result.detail["n_reference"] == 4 and result.detail["n_current"] == 5


def test_mmd_statistic_and_bandwidth_match_the_definition():
    rng = np.random.default_rng(3)
    reference, current = rng.normal(size=(12, 3)), rng.normal(loc=0.3, size=(9, 3))
    result = mmd_test(reference, current, ALPHA, permutations=50, seed=1)
    bandwidth = float(np.median(pdist(np.vstack([reference, current]))))
    assert result.detail["bandwidth"] == pytest.approx(bandwidth)
    assert result.statistic == pytest.approx(_naive_mmd2(reference, current, bandwidth))
    assert result.detail["permutations"] == 50


def test_mmd_p_value_is_a_permutation_p_value():
    rng = np.random.default_rng(4)
    for permutations in (1, 7, 100):
        result = mmd_test(rng.normal(size=(30, 4)), rng.normal(size=(25, 4)), ALPHA, permutations)
        assert 0.0 < result.p_value <= 1.0
        exceed = result.p_value * (1 + permutations) - 1
        assert exceed == pytest.approx(round(exceed)) and 0 <= round(exceed) <= permutations


def test_mmd_identical_rows_everywhere_give_p_one():
    rows = np.ones((20, 5))
    result = mmd_test(rows, rows.copy(), ALPHA, permutations=50)
    assert result.detail["bandwidth"] == 1.0  # median distance 0 -> 1.0
    assert result.p_value == 1.0 and not result.drifted


def test_mmd_subsamples_to_max_samples():
    rng = np.random.default_rng(5)
    result = mmd_test(
        rng.normal(size=(300, 8)), rng.normal(size=(90, 8)), ALPHA, permutations=20, max_samples=64
    )
    assert result.detail["n_reference"] == 64
    assert result.detail["n_current"] == 64
    small = mmd_test(rng.normal(size=(30, 8)), rng.normal(size=(40, 8)), ALPHA, permutations=20)
    assert (small.detail["n_reference"], small.detail["n_current"]) == (30, 40)


def test_mmd_is_reproducible_with_the_same_seed():
    rng = np.random.default_rng(6)
    reference, current = rng.normal(size=(600, 8)), rng.normal(loc=0.05, size=(600, 8))
    first = mmd_test(reference, current, ALPHA, permutations=100, seed=11, max_samples=200)
    second = mmd_test(reference, current, ALPHA, permutations=100, seed=11, max_samples=200)
    assert first == second
    assert first.p_value == second.p_value


# -- degenerate and bad inputs ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "current"),
    [
        ({}, {"a": 3, "b": 4}),
        ({"a": 3, "b": 4}, {"a": 0, "b": 0}),
        ({"a": 10}, {"a": 7}),
        ({"a": 10, "b": 0}, {"a": 7, "b": 0}),
        ({}, {}),
    ],
)
def test_label_balance_degenerate_inputs(reference, current):
    result = label_balance_test(reference, current, ALPHA)
    assert result.p_value == 1.0 and result.statistic == 0.0 and not result.drifted
    assert result.detail["reason"]


@pytest.mark.parametrize(("reference", "current"), [([], [1, 2, 3]), ([4, 5], []), ([], [])])
def test_length_degenerate_inputs(reference, current):
    result = length_test(reference, current, ALPHA)
    assert result.p_value == 1.0 and not result.drifted
    assert result.detail["reason"]


@pytest.mark.parametrize(("n_reference", "n_current"), [(0, 10), (10, 1), (1, 1), (0, 0)])
def test_mmd_degenerate_inputs(n_reference, n_current):
    rng = np.random.default_rng(7)
    result = mmd_test(rng.normal(size=(n_reference, 4)), rng.normal(size=(n_current, 4)), ALPHA)
    assert result.p_value == 1.0 and not result.drifted
    assert result.detail["reason"]


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        label_balance_test({"a": -1, "b": 3}, {"a": 1, "b": 3}, ALPHA)
    with pytest.raises(ValueError):
        label_balance_test({"a": 1, "b": 3}, {"a": 1, "b": 3}, 1.5)
    with pytest.raises(ValueError):
        length_test([1.0, float("nan")], [1.0, 2.0], ALPHA)
    with pytest.raises(ValueError):
        mmd_test(np.zeros((5, 3)), np.zeros((5, 4)), ALPHA)


def test_records_are_json_able():
    rng = np.random.default_rng(8)
    results = [
        label_balance_test({"a": 5, "b": 9}, {"a": 7, "b": 2, "c": 1}, ALPHA),
        length_test(_lengths(rng, 30), _lengths(rng, 30), ALPHA),
        mmd_test(rng.normal(size=(20, 3)), rng.normal(size=(20, 3)), ALPHA, permutations=20),
        length_test([], [1.0], ALPHA),
    ]
    for result in results:
        assert isinstance(result, DriftTest)
        record = json.loads(json.dumps(result.as_dict()))
        assert record["drifted"] == (record["p_value"] < record["alpha"])
        assert set(record) == {"name", "statistic", "p_value", "alpha", "drifted", "detail"}
