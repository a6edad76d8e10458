"""Progress of long work besides training (sample grids, AIS, importance sampling): a bar on a
terminal, and a line in the log every ``every`` seconds, so that a run in the background, under a
launcher or in a notebook's log file still says where it is and how long the rest will take."""

from __future__ import annotations

import logging
import time

from tqdm import tqdm

log = logging.getLogger("capsrun")

EVERY = 30.0  # seconds between two log lines


def duration(seconds: float) -> str:
    """``seconds`` as people say it: ``45 s``, ``12 min``, ``3 h 20 min``, ``2.5 days``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        hours, minutes = divmod(round(seconds / 60), 60)
        return f"{hours} h {minutes:02d} min"
    return f"{seconds / 86400:.1f} days"


class Progress:
    """``total`` units of work called ``what`` (``"AIS"``, ``"sample grid"``) in units of ``unit``;
    ``bar``: draw a tqdm bar too (on a terminal only). Use as a context manager, :meth:`update` as
    work is done; the log gets ``AIS: 2,000/10,000 temperatures (20 %), 1 min so far, about 4 min
    left`` every ``every`` seconds, nothing for work that ends sooner."""

    def __init__(self, total: int, what: str, unit: str = "steps", bar: bool = False, every: float = EVERY):
        self.total, self.what, self.unit, self.every = total, what, unit, every
        self.done = 0
        self.start = self.last = time.perf_counter()
        self.bar = tqdm(total=total, desc=what, unit="", leave=False, disable=None if bar else True)

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        now = time.perf_counter()
        if now - self.last >= self.every and 0 < self.done < self.total:
            self.last = now
            spent = now - self.start
            left = spent * (self.total - self.done) / self.done
            log.info(
                "%s: %s/%s %s (%.0f %%), %s so far, about %s left",
                self.what,
                f"{self.done:,}",
                f"{self.total:,}",
                self.unit,
                100 * self.done / self.total,
                duration(spent),
                duration(left),
            )

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
