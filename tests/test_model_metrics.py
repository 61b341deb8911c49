"""Metrics against values worked out by hand.

y_true = [0, 0, 0, 1, 1, 2], y_pred = [0, 0, 1, 1, 2, 2]:
  class 0: TP 2, support 3, predicted 2 -> recall 2/3, F1 = 2*2/(3+2) = 0.8
  class 1: TP 1, support 2, predicted 2 -> recall 1/2, F1 = 2/4 = 0.5
  class 2: TP 1, support 1, predicted 2 -> recall 1,   F1 = 2/3
  WAR = 4/6; UAR = (2/3 + 1/2 + 1)/3 = 13/18; WA-F1 = (3*0.8 + 2*0.5 + 1*2/3)/6 = 61/90;
  UF1 = (0.8 + 0.5 + 2/3)/3 = 59/90.
PCC of x = [1, 2, 3, 4], y = [2, 4, 5, 9]: sum dx*dy = 11, sum dx^2 = 5, sum dy^2 = 26 -> 11/sqrt(130).
"""

import math

import numpy as np
import pytest
import torch

from avfmae.metrics import evaluation_scores, pcc, uar, unweighted_f1, war, weighted_f1

Y_TRUE = [0, 0, 0, 1, 1, 2]
Y_PRED = [0, 0, 1, 1, 2, 2]


def test_classification_metrics_by_hand():
    assert war(Y_TRUE, Y_PRED) == pytest.approx(4 / 6)
    assert uar(Y_TRUE, Y_PRED) == pytest.approx(13 / 18)
    assert weighted_f1(Y_TRUE, Y_PRED) == pytest.approx(61 / 90)
    assert unweighted_f1(Y_TRUE, Y_PRED) == pytest.approx(59 / 90)


def test_scores_are_argmaxed_and_tensors_accepted():
    scores = torch.nn.functional.one_hot(torch.tensor(Y_PRED), 3).float() * 2 - 0.5
    assert uar(torch.tensor(Y_TRUE), scores) == pytest.approx(13 / 18)
    assert war(np.array(Y_TRUE), scores.numpy()) == pytest.approx(4 / 6)


def test_explicit_labels_include_absent_classes():
    assert uar(Y_TRUE, Y_PRED, labels=[0, 1, 2, 3]) == pytest.approx((2 / 3 + 1 / 2 + 1) / 4)
    assert unweighted_f1(Y_TRUE, Y_PRED, labels=[0, 1, 2, 3]) == pytest.approx((0.8 + 0.5 + 2 / 3) / 4)


def test_pcc_by_hand_and_per_column():
    assert pcc([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))
    cols = pcc(np.array([[1, 4], [2, 3], [3, 2], [4, 1]]), np.array([[2, 1], [4, 2], [5, 3], [9, 4]]))
    np.testing.assert_allclose(cols, [11 / math.sqrt(130), -1.0])
    assert math.isnan(pcc([1, 1, 1], [1, 2, 3]))


def test_bad_inputs():
    with pytest.raises(ValueError, match="y_true must be"):
        war([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="empty"):
        uar([], [])
    with pytest.raises(ValueError, match="share a shape"):
        pcc([1, 2], [[1], [2]])


def test_evaluation_scores_take_targets_first():
    # 3 of class 0 (all right), 1 of class 1 (predicted 0): UAR 0.5, WAR 0.75; with targets and
    # predictions swapped UAR would be (3/4 + 0) / 2 = 0.375
    y_true = [0, 0, 0, 1]
    outputs = torch.tensor([[2.0, 0.0], [1.0, 0.0], [3.0, 1.0], [0.5, 0.1]])
    scores, key = evaluation_scores(torch.tensor(y_true), outputs)
    assert key == "war"
    assert scores["uar"] == pytest.approx(0.5) and scores["war"] == pytest.approx(0.75)
    assert scores["wa_f1"] == pytest.approx(0.75 * (2 * 3 / (3 + 4)))  # F1 of class 0 = 6/7, class 1 = 0
    assert scores["uf1"] == pytest.approx(0.5 * (2 * 3 / (3 + 4)))


def test_evaluation_scores_regression_averages_targets():
    t = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]])
    scores, key = evaluation_scores(t, torch.stack([t[:, 0], -t[:, 1]], dim=1), regression=True)
    assert key == "pcc" and scores["pcc_0"] == pytest.approx(1.0) and scores["pcc_1"] == pytest.approx(-1.0)
    assert scores["pcc"] == pytest.approx(0.0)
    single, _ = evaluation_scores(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([[1.0], [2.0], [4.0]]), True)
    assert single == {"pcc": pytest.approx(1.0)}
