"""The organism scoring functions on planted arrays: each answer is known by construction."""

import numpy as np
import pytest

from diffkit.bench.organisms_score import (first_planted_rank, listed_scores, method_scores, planted_by_label,
                                           planted_items, precision_at_k, safe_auroc, share_threshold)


def test_planted_items_use_the_share_of_mass_against_the_base_rate():
    mass = np.array([10.0, 10.0, 10.0, 0.0, 4.0])
    on_planted = np.array([5.0, 0.4, 0.6, 0.0, 4.0])
    # base rate 0.3%: 20x in odds = 5.7% of the mass; items 0 (50%), 2 (6%), 4 (100%) qualify, 1 (4%) and the dead 3 not
    assert planted_items(mass, on_planted, 0.003).tolist() == [True, False, True, False, True]
    assert planted_items(mass, on_planted, 0.003, factor=50).tolist() == [True, False, False, False, True]
    assert share_threshold(0.001) == pytest.approx(0.02, rel=0.02)  # rare label: the plain 20x
    assert share_threshold(0.5) == pytest.approx(20 / 21)  # half the store: odds 20:1, still below 1


def test_planted_by_label_takes_each_part_of_the_behaviour_against_its_own_rate():
    labels = np.r_[np.zeros(960, int), np.ones(20, int), np.full(20, 2)]  # two parts, 2% each
    mass = np.array([10.0, 10.0, 10.0])
    by_label = {1: np.array([4.0, 0.0, 2.0]), 2: np.array([0.0, 4.0, 2.0])}
    # threshold 20x of 2% in odds: 29%; items 0 and 1 hold 40% on one part; item 2 holds 20% on each, 40% on the union
    assert planted_by_label(mass, by_label, labels).tolist() == [True, True, False]


def test_precision_and_first_rank_on_a_known_order():
    planted = np.zeros(100, bool)
    planted[[3, 7, 50]] = True
    scores = -np.arange(100, dtype=float)  # item i at rank i + 1
    assert precision_at_k(scores, planted, 10) == pytest.approx(0.2)
    assert precision_at_k(scores, planted, 50) == pytest.approx(0.04)
    assert first_planted_rank(scores, planted) == 4
    neg = np.flatnonzero(~planted)
    assert safe_auroc(scores, planted) == pytest.approx(np.mean([(neg > i).sum() / 97 for i in (3, 7, 50)]))


def test_ties_give_the_expected_value_not_the_input_order():
    planted = np.zeros(100, bool)
    planted[:5] = True  # first in input order: a stable sort would credit a constant score with 0.5
    flat = np.zeros(100)
    assert precision_at_k(flat, planted, 10) == pytest.approx(0.05)
    assert first_planted_rank(flat, planted) == pytest.approx(1 + 95 / 6)
    assert safe_auroc(flat, planted) == pytest.approx(0.5)


def test_unlisted_and_nan_items_tie_at_the_bottom():
    s = listed_scores(6, np.array([4, 1]))
    assert s[4] > s[1] > -np.inf and np.isneginf(s[[0, 2, 3, 5]]).all()
    planted = np.array([False, False, True, False, False, False])
    assert first_planted_rank(s, planted) == pytest.approx(3 + 3 / 2)  # 2 listed above, 3 unlisted tied with it
    nan = np.array([np.nan, 1.0, np.nan])
    assert first_planted_rank(nan, np.array([True, False, False])) == pytest.approx(2 + 1 / 2)


def test_method_scores_shape_and_token_auroc():
    planted = np.array([True] + [False] * 59)
    tokens = np.r_[np.ones(10), np.zeros(990)]
    out = method_scores(-np.arange(60.0), planted, token_scores=tokens + np.linspace(0, 0.5, 1000),
                        token_labels=tokens.astype(int))
    assert set(out) >= {"precision_at_10", "precision_at_50", "first_planted_rank", "auroc", "token_auroc"}
    assert out["precision_at_10"] == pytest.approx(0.1) and out["first_planted_rank"] == 1
    assert out["token_auroc"] == pytest.approx(1.0)
    none = method_scores(np.zeros(5), np.zeros(5, bool))
    assert none["first_planted_rank"] is None and none["auroc"] is None and "token_auroc" not in none
