"""Evaluation metrics of the paper's three tasks.

CEA: UAR (unweighted average recall = mean per-class recall), WAR (weighted average recall =
accuracy), weighted F1 (per-class F1 weighted by class support). DEA: weighted F1 (AVCAffe) and PCC
(Pearson correlation, Werewolf-XL). MER: UF1 (unweighted F1 = mean per-class F1).

Inputs are array-likes (numpy, torch, lists). Predictions may be class indices [N] or scores
[N, classes] (arg-maxed). Per-class averages run over the classes that occur in the targets or the
predictions (``labels=None``) or over the given ``labels``; a class with no support contributes
recall/F1 0 when listed explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _as_array(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    return arr


def _labels(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t = _as_array(y_true, "y_true")
    p = _as_array(y_pred, "y_pred")
    if p.ndim == 2:
        p = p.argmax(axis=1)
    if t.ndim != 1 or p.ndim != 1 or t.shape != p.shape:
        raise ValueError(f"y_true must be [N] and y_pred [N] or [N, classes]; got {t.shape} and "
                         f"{_as_array(y_pred, 'y_pred').shape}")
    return t.astype(np.int64), p.astype(np.int64)


def _per_class(y_true: Any, y_pred: Any, labels: Sequence[int] | None):
    t, p = _labels(y_true, y_pred)
    classes = np.unique(np.concatenate([t, p])) if labels is None else np.asarray(labels, dtype=np.int64)
    tp = np.array([np.sum((t == c) & (p == c)) for c in classes], dtype=np.float64)
    support = np.array([np.sum(t == c) for c in classes], dtype=np.float64)
    predicted = np.array([np.sum(p == c) for c in classes], dtype=np.float64)
    return tp, support, predicted


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)


def war(y_true: Any, y_pred: Any) -> float:
    """Weighted average recall = accuracy."""
    t, p = _labels(y_true, y_pred)
    return float(np.mean(t == p))


def uar(y_true: Any, y_pred: Any, labels: Sequence[int] | None = None) -> float:
    """Unweighted average recall: mean over classes of TP / support."""
    tp, support, _ = _per_class(y_true, y_pred, labels)
    return float(np.mean(_safe_div(tp, support)))


def _f1(tp: np.ndarray, support: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    return _safe_div(2.0 * tp, support + predicted)   # 2TP / (2TP + FP + FN)


def weighted_f1(y_true: Any, y_pred: Any, labels: Sequence[int] | None = None) -> float:
    """Per-class F1 averaged with weights proportional to class support (WA-F1)."""
    tp, support, predicted = _per_class(y_true, y_pred, labels)
    return float(np.sum(_f1(tp, support, predicted) * support) / np.sum(support))


def unweighted_f1(y_true: Any, y_pred: Any, labels: Sequence[int] | None = None) -> float:
    """UF1 (micro-expression recognition): plain mean of per-class F1."""
    tp, support, predicted = _per_class(y_true, y_pred, labels)
    return float(np.mean(_f1(tp, support, predicted)))


def pcc(y_true: Any, y_pred: Any) -> float | np.ndarray:
    """Pearson correlation; [N] -> float, [N, D] -> one value per column."""
    t = _as_array(y_true, "y_true").astype(np.float64)
    p = _as_array(y_pred, "y_pred").astype(np.float64)
    if t.shape != p.shape or t.ndim not in (1, 2):
        raise ValueError(f"y_true and y_pred must share a shape [N] or [N, D], got {t.shape} and {p.shape}")
    tc, pc = t - t.mean(axis=0), p - p.mean(axis=0)
    denom = np.sqrt(np.sum(tc ** 2, axis=0) * np.sum(pc ** 2, axis=0))
    r = np.divide(np.sum(tc * pc, axis=0), denom, out=np.full(np.shape(denom), np.nan), where=denom > 0)
    return float(r) if t.ndim == 1 else r


def evaluation_scores(y_true: Any, outputs: Any, regression: bool = False) -> tuple[dict[str, float], str]:
    """The scores a training run logs each epoch, and the name of the one that picks the best checkpoint.

    Classification: outputs are scores [N, classes], y_true class indices [N] -> UAR, WAR, weighted F1
    and UF1 (the micro-expression metric; best by WAR). Regression: outputs and y_true [N] or [N, D] ->
    PCC (mean over the D targets, and each target's PCC as ``pcc_<d>`` when D > 1; best by PCC).
    """
    if regression:
        t = _as_array(y_true, "y_true").astype(np.float64)
        p = _as_array(outputs, "outputs").astype(np.float64).reshape(t.shape)
        per_target = np.atleast_1d(pcc(t, p))
        scores = {"pcc": float(np.mean(per_target))}
        if per_target.size > 1:
            scores.update({f"pcc_{d}": float(r) for d, r in enumerate(per_target)})
        return scores, "pcc"
    return {"uar": uar(y_true, outputs), "war": war(y_true, outputs), "wa_f1": weighted_f1(y_true, outputs),
            "uf1": unweighted_f1(y_true, outputs)}, "war"
