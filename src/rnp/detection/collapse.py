"""Whether a model carries a backdoor, and of which kind, from where repeated unlearnings send
each class: :func:`detect_backdoor` makes the unlearnings (:func:`expose_runs
<rnp.detection.exposure.expose_runs>`) and reads their collapse map (:mod:`rnp.metrics.collapse`,
where the statistic, its threshold and its development data are described)."""

from __future__ import annotations

from rnp.data.images import as_image_set
from rnp.detection.exposure import expose_runs, run_summaries
from rnp.metrics.collapse import (MAP_AGREEMENT_THRESHOLD, RUNS, SUBSET, BackdoorVerdict, Calibration, collapse_map,
                                  judge)


def detect_backdoor(model, clean_data, threshold: float | Calibration = MAP_AGREEMENT_THRESHOLD, *,
                    runs: int = RUNS, subset: float = SUBSET, config=None, seed: int = 0,
                    progress: bool = False, **overrides) -> BackdoorVerdict:
    """The verdict on ``model`` from ``runs`` unlearnings (RNP's stage 1, ``config`` or keyword
    overrides) on random ``subset`` shares of the defender's clean images: the whole path from a
    model to :func:`rnp.metrics.collapse.judge`, which the map agreement of known-clean models
    can calibrate (:func:`rnp.metrics.collapse.calibrate`)."""
    exposures = expose_runs(model, clean_data, runs, subset, config, seed=seed, progress=progress, **overrides)
    summaries = run_summaries(exposures, as_image_set(clean_data))
    return judge(collapse_map([summary["confusion"] for summary in summaries]), threshold)
