"""Long loops' step counting: the progress bar, the time estimate, and the stop-early ending.

Every long loop (training, each defense's stages, the trigger searches) counts its steps through
a :class:`Progress`. After the first step (which pays for warm-up: allocations, kernel
selection) and :data:`SAMPLE_STEPS` more, it knows the time a step takes and logs one line on
the ``rnp.progress`` logger at INFO level, e.g. ``estimated 12 min (training: 30 epochs x 391
steps at 0.31 s/step)``; the record carries ``estimate_seconds``. The sampled steps are part of
the work, not a separate trial. The CLI prints these lines; in Python they are silent unless
logging shows INFO records, and :attr:`Progress.estimate` holds the number.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("rnp.progress")

SAMPLE_STEPS = 3
"""Steps timed, after the first, before the estimate is made."""


class Progress:
    """Counts the steps of one loop of ``total`` steps, drives an optional tqdm ``bar``, and
    logs the loop's time estimate once it is known.

    ``detail`` says what the total is made of ("20 epochs x 4 steps"; default "N steps"), ``unit``
    what one counted step is ("step", "batch").
    ``bounded`` marks a loop that may stop early (a stopping rule, an early stop): its estimate
    is an upper bound and says "at most". ``timed=False`` logs no estimate (a part of a loop
    that an outer :class:`Progress` times as a whole, such as one epoch of training).
    """

    def __init__(self, total: int, desc: str, bar=None, *, detail: str = "", unit: str = "step",
                 bounded: bool = False, timed: bool = True):
        self.total, self.desc, self.bar = total, desc, bar
        self.detail, self.unit, self.bounded = detail or f"{total} {unit}s", unit, bounded
        self.timed = timed
        self.n = 0
        self.estimate: float | None = None
        """Seconds the whole loop is expected to take, once :data:`SAMPLE_STEPS` steps were timed."""
        self._start = time.perf_counter()
        self._warm: float | None = None  # when the first step ended, and the count then
        self._warm_n = 0

    def update(self, n: int = 1) -> None:
        """Counts ``n`` finished steps."""
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        now = time.perf_counter()
        if not self.timed:
            return
        if self._warm is None:
            self._warm, self._warm_n = now, self.n
        elif self.estimate is None and self.n - self._warm_n >= SAMPLE_STEPS and self.n < self.total:
            per_step = (now - self._warm) / (self.n - self._warm_n)
            self.estimate = now - self._start + (self.total - self.n) * per_step
            bound = "at most " if self.bounded else ""
            logger.info(f"estimated {bound}{format_duration(self.estimate)} ({self.desc}: "
                        f"{self.detail} at {per_step:.3g} s/{self.unit})",
                        extra={"estimate_seconds": self.estimate})

    def set_postfix(self, **values) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def stop_early(self, note: str) -> None:
        """Ends the count where the loop stopped: the bar shows ``n/n`` and ``note`` (why and
        where it stopped) instead of freezing part-way."""
        self.total = self.n
        if self.bar is not None:
            self.bar.total = self.n
            self.bar.set_description(f"{self.desc} ({note})", refresh=False)
            self.bar.refresh()

    def skip(self, steps: int) -> None:
        """Takes ``steps`` that will not run (one part of the loop stopped early) off the total,
        so the bar's end stays reachable."""
        self.total -= steps
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()


def format_duration(seconds: float) -> str:
    """``42 s``, ``12 min``, ``3.5 h``: the unit a person reads at a glance."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
