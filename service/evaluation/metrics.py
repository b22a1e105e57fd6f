"""Ranking metrics of the retrieval and copy detection evaluations (NumPy only).

- :func:`average_precision`: the area under one query's precision-recall curve, non-interpolated:
  the mean, over the relevant items, of the precision at the rank where each one is found (a
  relevant item that is never found contributes 0). This is the AP of the revisited Oxford/Paris
  protocol (Radenovic et al. 2018) that DINO's image retrieval uses (Caron et al. 2021, Sec. 4.2,
  Table 6), without their "junk" images (our labelled folders have none).
- :func:`micro_average_precision`: µAP, the AP of *one* precision-recall curve made of every
  (query, database item) pair of all queries' result lists pooled and sorted by score (Douze et al.
  2009; the copy detection convention of Copydays and of DISC21). Unlike the mean of per-query APs,
  it rewards scores that are comparable across queries, which is what a copy detector needs: one
  threshold decides "copy" or "not a copy" for every query.
- :func:`precision_at_k`, :func:`hit_at_k`: the share of relevant items in the top k, and whether
  there is at least one (the "recall@k" of retrieval papers).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _as_bool(relevant: Sequence[bool] | np.ndarray) -> np.ndarray:
    return np.asarray(relevant, dtype=bool).reshape(-1)


def average_precision(relevant: Sequence[bool] | np.ndarray, n_relevant: int | None = None) -> float:
    """AP of one ranked result list.

    ``relevant[i]`` says whether the item at rank ``i + 1`` is relevant; ``n_relevant`` is the number
    of relevant items in the whole database (default: those in the list, i.e. the list is the full
    ranking). AP = (1 / n_relevant) * sum over relevant ranks r of precision@r. Relevant items missing
    from a truncated list count as never found.
    """
    rel = _as_bool(relevant)
    total = int(rel.sum()) if n_relevant is None else int(n_relevant)
    if total <= 0:
        raise ValueError("average precision needs at least one relevant item in the database")
    if int(rel.sum()) > total:
        raise ValueError(f"the list holds {int(rel.sum())} relevant items, more than n_relevant={total}")
    ranks = np.flatnonzero(rel) + 1  # 1-based ranks of the relevant items
    hits = np.arange(1, len(ranks) + 1)  # relevant items found up to and including each of them
    return float((hits / ranks).sum() / total)


def precision_at_k(relevant: Sequence[bool] | np.ndarray, k: int) -> float:
    """Share of relevant items among the top ``k`` (a list shorter than k counts its missing ranks as misses)."""
    if k < 1:
        raise ValueError("k must be at least 1")
    return float(_as_bool(relevant)[:k].sum() / k)


def hit_at_k(relevant: Sequence[bool] | np.ndarray, k: int) -> bool:
    """Whether at least one of the top ``k`` is relevant (per-query "recall@k" of retrieval papers)."""
    if k < 1:
        raise ValueError("k must be at least 1")
    return bool(_as_bool(relevant)[:k].any())


def micro_average_precision(
    scores: Sequence[float] | np.ndarray, positives: Sequence[bool] | np.ndarray, n_positives: int
) -> float:
    """µAP of pooled (query, database item) pairs.

    ``scores[i]`` is the similarity of pair i and ``positives[i]`` whether it is a true match; the
    pairs of every query's result list are pooled and sorted by decreasing score (ties: non-matches
    first, the pessimistic order, so that a constant score earns nothing). ``n_positives`` is the
    number of true pairs that exist (for copy detection: one per query), so that true pairs missing
    from the lists lower recall. µAP = (1 / n_positives) * sum over true pairs of the precision at
    their position in the pooled order.
    """
    score = np.asarray(scores, dtype=np.float64).reshape(-1)
    positive = _as_bool(positives)
    if score.shape != positive.shape:
        raise ValueError("scores and positives must have the same length")
    if n_positives <= 0:
        raise ValueError("µAP needs at least one true pair")
    if int(positive.sum()) > n_positives:
        raise ValueError(f"{int(positive.sum())} true pairs listed, more than n_positives={n_positives}")
    # np.lexsort sorts by the last key first: decreasing score, then non-matches before matches
    order = np.lexsort((positive, -score))
    return average_precision(positive[order], n_positives)


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean (0.0 for no values), as a plain float for JSON."""
    return float(np.mean(values)) if len(values) else 0.0
