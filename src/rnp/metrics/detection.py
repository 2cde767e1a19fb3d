"""Detection metrics for per-sample suspicion scores (AUROC, the TPR at a fixed FPR) and the MAD
anomaly index that flags an outlying class.

Convention everywhere: a higher score means more suspicious (more likely poisoned), and
``positives`` is a boolean mask marking the truly poisoned samples.

- :func:`auroc` is the Mann-Whitney U statistic divided by ``n_pos * n_neg``: the probability
  that a random positive scores above a random negative, a tie counting one half. It equals
  the area under the ROC curve with ties drawn as diagonal segments.
- :func:`threshold_at_fpr` is the smallest score ``t`` such that the fraction of negatives
  scoring strictly ABOVE ``t`` is at most ``fpr``; :func:`tpr_at_fpr` is the fraction of
  positives scoring strictly above that threshold. Samples equal to the threshold count as not
  flagged, so ties never let the false-positive rate exceed ``fpr``; with ``fpr = 0`` the
  threshold is the highest negative score, which no negative exceeds (nothing flagged), and
  with ``fpr = 1`` it is ``-inf`` (everything is flagged). It is the one threshold calibration
  of the package: detection thresholds set from scores of known-clean samples or models use it;
  :func:`share_above` is the rate a threshold realises on any scores, and
  :func:`false_alarm_bound` the rate it promises on one more negative, averaged over the draw of
  the known negatives; :func:`false_alarm_interval` how far the rate of one such threshold may
  fall from it.
- :func:`anomaly_indices` is the median-absolute-deviation score of Neural Cleanse (Wang et al.,
  IEEE S&P 2019): ``|value - median| / (1.4826 * MAD)``, used on trigger norms and on RNP's
  drift shares alike.
"""

from __future__ import annotations

import math

import torch

from rnp.errors import RnpError

MAD_CONSISTENCY = 1.4826  # the MAD of a normal sample times this estimates its std (NC's release)

# floor(fpr * n) must not drop to k - 1 when fpr * n is k up to rounding (0.29 * 100 = 28.999...).
_FLOOR_SLACK = 1e-9


def auroc(scores, positives) -> float:
    """Area under the ROC curve of ``scores`` for the ``positives`` mask (ties count half)."""
    scores, positives = _check(scores, positives)
    ranks = _average_ranks(scores)
    n_pos = int(positives.sum())
    n_neg = len(scores) - n_pos
    u = float(ranks[positives].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def threshold_at_fpr(negative_scores, fpr: float) -> float:
    """The smallest score at which at most ``fpr`` of ``negative_scores`` lie strictly above:
    the threshold that flags (score > threshold) at most that share of known-negative samples
    or models. RnpError for no scores, a NaN, or ``fpr`` outside [0, 1]."""
    negative_scores = _as_scores(negative_scores)
    if len(negative_scores) == 0:
        raise RnpError("threshold_at_fpr needs at least one negative score")
    _check_fpr(fpr)
    allowed = math.floor(fpr * len(negative_scores) + _FLOOR_SLACK)
    if allowed >= len(negative_scores):
        return -math.inf
    return float(negative_scores.sort(descending=True).values[allowed])


def false_alarm_bound(negatives: int, fpr: float) -> float:
    """The chance that one more negative, exchangeable with the ``negatives`` known ones, scores
    above :func:`threshold_at_fpr` of them: ``(floor(fpr * n) + 1) / (n + 1)``, at most 1.

    The threshold is the ``floor(fpr * n) + 1``-th highest known score; a new negative lands
    above it with that rank's chance among ``n + 1`` exchangeable scores (ties only lower it).
    It exceeds ``fpr`` for few negatives: 19 are needed for 5% at ``fpr`` 0.
    """
    if isinstance(negatives, bool) or not isinstance(negatives, int) or negatives < 1:
        raise RnpError(f"false_alarm_bound needs at least one negative, got {negatives!r}")
    _check_fpr(fpr)
    allowed = math.floor(fpr * negatives + _FLOOR_SLACK)
    return min(1.0, (allowed + 1) / (negatives + 1))


def false_alarm_interval(negatives: int, fpr: float, confidence: float = 0.95) -> tuple[float, float]:
    """The central ``confidence`` interval of the false-positive rate that :func:`threshold_at_fpr`
    of ``negatives`` exchangeable known negatives realises on the population they come from.

    :func:`false_alarm_bound` is that rate's mean over draws of the known negatives; a single
    threshold's rate varies around it. The threshold is the ``k = floor(fpr * n) + 1``-th highest
    of ``n`` continuous scores, so the share of the population above it is Beta(k, n + 1 - k)
    distributed, whatever the scores' distribution (ties only lower it). Its quantiles come from
    the identity ``P(rate <= q) = P(Binomial(n, q) >= k)``. With 500 negatives at 5% the interval
    is about 3.4-7.3%: no threshold set on 500 clean images pins a rate to within a point.
    """
    bound = false_alarm_bound(negatives, fpr)
    if not 0 < confidence < 1:
        raise RnpError(f"confidence lies in (0, 1), got {confidence!r}")
    if bound >= 1.0:
        return 1.0, 1.0
    k = round(bound * (negatives + 1))
    tail = (1 - confidence) / 2
    return (_beta_quantile(k, negatives, tail), _beta_quantile(k, negatives, 1 - tail))


def _beta_quantile(k: int, n: int, level: float) -> float:
    """The ``level`` quantile of Beta(k, n + 1 - k), by bisection on its binomial-tail CDF."""
    low, high = 0.0, 1.0
    for _ in range(60):  # 2**-60: below float64's resolution of a rate
        middle = (low + high) / 2
        if _binomial_at_least(k, n, middle) < level:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def _binomial_at_least(k: int, n: int, q: float) -> float:
    """``P(Binomial(n, q) >= k)``, summed in log space over the ``k`` terms below it."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    j = torch.arange(k, dtype=torch.float64)
    log_terms = (math.lgamma(n + 1) - torch.lgamma(j + 1) - torch.lgamma(n - j + 1)
                 + j * math.log(q) + (n - j) * math.log1p(-q))
    return max(0.0, 1.0 - float(torch.logsumexp(log_terms, dim=0).exp()))


def tpr_at_fpr(scores, positives, fpr: float = 0.05) -> float:
    """Fraction of positives scoring strictly above :func:`threshold_at_fpr` of the negatives."""
    scores, positives = _check(scores, positives)
    threshold = threshold_at_fpr(scores[~positives], fpr)
    return share_above(scores[positives], threshold)


def share_above(scores, threshold: float) -> float:
    """Fraction of ``scores`` strictly above ``threshold``: the false-positive rate a threshold
    realises on known-clean scores, the true-positive rate on known-poisoned ones. Compared in
    float64, as :func:`threshold_at_fpr` sets thresholds."""
    scores = torch.as_tensor(scores).detach().cpu().double()
    return float((scores > threshold).double().mean())


def anomaly_indices(values, min_spread: float = 0.0) -> torch.Tensor:
    """Anomaly index of every value: ``|value - median| / max(1.4826 * MAD, min_spread)``.

    The median is the usual one (mean of the two middle values for an even count), as NumPy's
    in Neural Cleanse's release. ``min_spread`` floors the robust spread so the index stays finite
    when most values are equal; without a floor, a MAD of 0 gives 0 to the values at the median
    and infinity to all others.
    """
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if len(values) == 0:
        raise RnpError("anomaly indices need at least one value")
    deviation = (values - values.quantile(0.5)).abs()
    spread = max(MAD_CONSISTENCY * float(deviation.quantile(0.5)), min_spread)
    if spread == 0:
        return torch.where(deviation == 0, 0.0, math.inf).to(torch.float64)
    return deviation / spread


def positives_mask(indices, length: int) -> torch.Tensor:
    """A boolean mask of ``length`` that is True at ``indices`` (e.g. the poisoned indices)."""
    indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= length):
        raise RnpError(f"indices must lie in [0, {length - 1}]")
    mask = torch.zeros(length, dtype=torch.bool)
    mask[indices] = True
    return mask


def _average_ranks(scores: torch.Tensor) -> torch.Tensor:
    """1-based ranks in ascending order, tied scores sharing the mean of their ranks."""
    order = scores.argsort(stable=True)
    _, inverse, counts = torch.unique(scores[order], return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # rank of the last member of each group of ties
    mean_rank = last - (counts.double() - 1) / 2
    ranks = torch.empty_like(scores)
    ranks[order] = mean_rank[inverse]
    return ranks


def _check(scores, positives) -> tuple[torch.Tensor, torch.Tensor]:
    scores = _as_scores(scores)
    positives = torch.as_tensor(positives)
    if positives.dtype != torch.bool:
        raise RnpError(f"positives must be a boolean mask, got dtype {positives.dtype}")
    positives = positives.reshape(-1).cpu()
    if len(positives) != len(scores):
        raise RnpError(f"{len(scores)} scores but {len(positives)} positive flags")
    n_pos = int(positives.sum())
    if n_pos == 0 or n_pos == len(scores):
        raise RnpError("detection metrics need at least one positive and one negative sample")
    return scores, positives


def _as_scores(scores) -> torch.Tensor:
    """A flat float64 CPU tensor. Python numbers are read as float64 (torch's default would be
    float32), so a threshold compares exactly against the very scores it was set from."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu()
    scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    if bool(torch.isnan(scores).any()):
        raise RnpError("scores contain NaN")
    return scores


def _check_fpr(fpr: float) -> None:
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0 <= fpr <= 1:
        raise RnpError(f"fpr must be a number in [0, 1], got {fpr!r}")
