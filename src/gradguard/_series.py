"""Level shifts in a host-side series (a loss or a gradient norm over steps).

A *level shift* is a rise that stays up: the series' running median climbs to at least
``min_factor`` times the best level reached before, and stays there for at least ``window``
points (or until the series ends). A single outlier batch, even one at 10x or 1000x the median,
never makes one, because the trailing median needs a majority of its window raised. A rise that
creeps up slowly (a learning rate growing 5 % a step) makes one as soon as its running median
crosses the factor.

Both the live doctor (a loss that climbs far above its start within the doctor's own steps) and the
recorded-run report (an LR burst whose loss doubles and stays up) read the same primitive, so the
two never disagree on what counts as "rose and stayed up".

Scale-free: for a positive series the rise is the ratio to the level before; a series that also
takes non-positive values is measured against ``max(|before|, spread)`` (``spread`` is the robust
standard deviation of the whole series), so multiplying the series by any positive constant
gives the same shifts.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["LevelShift", "level_shifts"]


@dataclass(frozen=True)
class LevelShift:
    """One rise that stayed up.

    Attributes:
        start: index (into the series given) of the first raised value: the onset.
        before: the level before the onset: the lowest running median reached until then.
        after: the raised level: the highest running median reached during the shift.
        factor: ``after / before`` for a positive series (the size of the rise, scale-free).
        end: index at which the running median was back near ``before`` (within
            ``1 + (min_factor - 1) / 5`` of it), or ``None`` when the series never came back.
    """

    start: int
    before: float
    after: float
    factor: float
    end: int | None

    @property
    def recovered(self) -> bool:
        return self.end is not None


def _check(min_factor: float, window: int) -> None:
    if not (isinstance(min_factor, (int, float)) and math.isfinite(min_factor) and min_factor > 1):
        raise ValueError(f"`min_factor` must be a finite number > 1, got {min_factor!r}; "
                         "use e.g. 2.0 for 'the level doubled'.")
    if not (isinstance(window, int) and not isinstance(window, bool) and window >= 1):
        raise ValueError(f"`window` must be an int >= 1, got {window!r}; use e.g. 5 (the running "
                         "median's length: a shift must raise a majority of it).")


def level_shifts(values: Sequence[float], *, min_factor: float = 2.0,
                 window: int = 5) -> list[LevelShift]:
    """Find the rises of ``values`` that stayed up, in order.

    Args:
        values: the series, one value per step. Non-finite values (NaN: not recorded; ±inf) are
            passed over; the indices returned still refer to ``values``.
        min_factor: how large a rise counts, relative to the level before it (2.0: doubled).
        window: length of the trailing running median. A rise must hold a majority of a window to
            register, and must stay up for ``window`` more points (or until the series ends).

    Returns:
        The shifts, earliest first. After a shift that recovered the search goes on; a shift that
        never came back is the last one.

    >>> [s.start for s in level_shifts([1.0] * 20 + [3.0] * 20)]
    [20]
    >>> level_shifts([1.0] * 20 + [30.0] + [1.0] * 20)  # one outlier is not a level
    []
    """
    _check(min_factor, window)
    idx = [i for i, v in enumerate(values) if isinstance(v, (int, float)) and math.isfinite(v)]
    y = [float(values[i]) for i in idx]
    n = len(y)
    if n < window + 1:
        return []
    top = max(abs(v) for v in y)
    if top == 0:
        return []
    if min(y) > 0:
        floor = 0.0  # a positive series: the rise is the plain ratio to the level before
    else:
        spread = 1.4826 * statistics.median(abs(v - statistics.median(y)) for v in y)
        floor = max(spread, 1e-12 * top)

    def level(v: float, base: float) -> float:
        """The rise of ``v`` above ``base`` as a factor (v / base for a positive series)."""
        return 1.0 + (v - base) / max(abs(base), floor) if floor else v / base

    med = [statistics.median(y[k - window + 1:k + 1]) for k in range(window - 1, n)]
    back = 1.0 + (min_factor - 1.0) / 5.0
    out: list[LevelShift] = []
    base = med[0]
    k = 0
    while k < len(med):
        if level(med[k], base) < min_factor:
            base = min(base, med[k])
            k += 1
            continue
        # the running median crossed: does it stay up for `window` more points?
        stay = k
        while stay < len(med) and level(med[stay], base) >= min_factor:
            stay += 1
        if stay - k < window and stay < len(med):
            base = min(base, med[k])
            k += 1
            continue
        pos = k + window - 1  # the crossing median's last point, as a position in y
        threshold = base + (min_factor - 1.0) * max(abs(base), floor)
        onset = next(j for j in range(pos - window + 1, pos + 1) if y[j] >= threshold)
        end_k = next((j for j in range(stay, len(med)) if level(med[j], base) <= back), None)
        peak = max(med[k:end_k if end_k is not None else len(med)])
        out.append(LevelShift(
            start=idx[onset], before=base, after=peak, factor=level(peak, base),
            end=None if end_k is None else idx[end_k + window - 1]))
        if end_k is None:
            break
        base = min(base, med[end_k])
        k = end_k + 1
    return out
