"""Per-step records kept on the device, read back in batches.

:class:`HistoryBuffer` is the hot-path half: ``record()`` writes one row of device tensors into a
preallocated device buffer (no host sync). ``flush()`` reads every pending row to the host with
**one** sync and returns a :class:`History`, the host-side, columnar half that detectors, sinks and
reports read. ``History`` also round-trips through JSON lines (what :class:`gradguard.JSONLSink`
writes and ``gradguard report RUN.jsonl`` reads).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradguard._checks import check_int

__all__ = ["SCALAR_FIELDS", "History", "HistoryBuffer"]

#: Per-step scalar columns, in row order. Booleans are stored as 0/1; NaN means "not recorded".
SCALAR_FIELDS = ("loss", "global_norm", "threshold", "clipped", "skipped", "lr_scale")


@dataclass
class History:
    """Columnar, host-side history of guarded steps.

    Attributes:
        names: per-tensor column names (qualified parameter names, in module order).
        step: optimizer-step index of each row.
        loss, global_norm, threshold, lr_scale: floats per row (NaN where not recorded;
            ``threshold`` is +inf where nothing clipped by norm).
        clipped, skipped: bools per row.
        layer_norm: per row, the gradient norm of each named tensor (``len(names)`` floats).
        update_ratio: per row, ``||Δw|| / ||w||`` of each named tensor, NaN where not measured.
    """

    names: list[str]
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    global_norm: list[float] = field(default_factory=list)
    threshold: list[float] = field(default_factory=list)
    clipped: list[bool] = field(default_factory=list)
    skipped: list[bool] = field(default_factory=list)
    lr_scale: list[float] = field(default_factory=list)
    layer_norm: list[list[float]] = field(default_factory=list)
    update_ratio: list[list[float]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.step)

    def _columns(self) -> tuple[list[Any], ...]:
        return (self.step, self.loss, self.global_norm, self.threshold, self.clipped,
                self.skipped, self.lr_scale, self.layer_norm, self.update_ratio)

    def extend(self, other: History, max_rows: int | None = None) -> None:
        """Append ``other``'s rows; keep at most the last ``max_rows`` rows."""
        if other.names != self.names:
            raise ValueError(
                "`other` has different tensor names than this History; histories of different "
                "models cannot be concatenated."
            )
        for mine, theirs in zip(self._columns(), other._columns()):
            mine.extend(theirs)
        if max_rows is not None and len(self) > max_rows:
            drop = len(self) - max_rows
            for col in self._columns():
                del col[:drop]

    def tail(self, n: int) -> History:
        """A new History with the last ``n`` rows."""
        out = History(list(self.names))
        for mine, src in zip(out._columns(), self._columns()):
            mine.extend(src[-n:] if n > 0 else [])
        return out

    def layer_series(self, name: str) -> list[float]:
        """The gradient norm of tensor ``name`` at every row."""
        try:
            j = self.names.index(name)
        except ValueError:
            raise KeyError(
                f"no tensor named {name!r} in this History; known names: {self.names[:8]}"
            ) from None
        return [row[j] for row in self.layer_norm]

    # -- records (one dict per step) -------------------------------------------------------------
    def records(self) -> Iterator[dict[str, Any]]:
        """One plain dict per row: the scalar fields plus ``layer_norm``/``update_ratio`` dicts."""
        for i in range(len(self)):
            rec: dict[str, Any] = {"step": self.step[i]}
            for f in SCALAR_FIELDS:
                rec[f] = getattr(self, f)[i]
            rec["layer_norm"] = dict(zip(self.names, self.layer_norm[i]))
            rec["update_ratio"] = dict(zip(self.names, self.update_ratio[i]))
            yield rec

    @classmethod
    def from_records(cls, records: Iterable[dict[str, Any]]) -> History:
        """Rebuild a History from :meth:`records` dicts (names from the first record)."""
        hist: History | None = None
        for rec in records:
            if hist is None:
                hist = cls(list(rec.get("layer_norm", {}).keys()))
            hist.step.append(int(rec["step"]))
            for f in SCALAR_FIELDS:
                v = rec.get(f, math.nan)
                if f == "threshold" and v is None:  # JSONL's null: no norm threshold
                    v = math.inf
                getattr(hist, f).append(bool(v) if f in ("clipped", "skipped") else _float(v))
            ln = rec.get("layer_norm", {})
            ur = rec.get("update_ratio", {})
            hist.layer_norm.append([_float(ln.get(n, math.nan)) for n in hist.names])
            hist.update_ratio.append([_float(ur.get(n, math.nan)) for n in hist.names])
        return hist if hist is not None else cls([])

    def to_jsonl(self, path: str | Path, *, append: bool = False) -> None:
        """Write one JSON object per row (docs/jsonl.md): ``threshold`` is a number, or null
        where there is none; other non-finite floats are the strings "nan", "inf", "-inf"."""
        with open(path, "a" if append else "w", encoding="utf-8") as f:
            for rec in self.records():
                if not math.isfinite(rec["threshold"]):
                    rec["threshold"] = None
                f.write(json.dumps(_jsonable(rec)) + "\n")

    @classmethod
    def from_jsonl(cls, path: str | Path) -> History:
        """Read a file written by :meth:`to_jsonl` or :class:`gradguard.JSONLSink`."""
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(
                f"`path` {str(p)!r} does not exist; pass the JSONL file a JSONLSink wrote."
            )
        with open(p, encoding="utf-8") as f:
            lines = [ln for ln in f if ln.strip()]
        try:
            return cls.from_records(json.loads(ln) for ln in lines)
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(
                f"{str(p)!r} is not a gradguard history (one JSON object per line with 'step', "
                f"'global_norm' and 'layer_norm'): {e}"
            ) from None


def _float(v: Any) -> float:
    if v is None:
        return math.nan
    return float(v)  # float("nan"), float("inf") and float("-inf") parse the string forms


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


class HistoryBuffer:
    """A preallocated device buffer of per-step rows; ``record`` is sync-free, ``flush`` syncs once.

    Row layout: ``SCALAR_FIELDS`` then ``len(names)`` per-tensor gradient norms then
    ``len(names)`` update ratios, in float32 (float64 if ``dtype`` says so).

    Args:
        names: per-tensor column names, in module order.
        capacity: rows held before a flush is due (``record`` raises when full).
        device: where the buffer lives (the gradients' device).
    """

    def __init__(
        self,
        names: Sequence[str],
        capacity: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.names = list(names)
        self.capacity = check_int("capacity", capacity, minimum=1)
        n = len(self.names)
        self._width = len(SCALAR_FIELDS) + 2 * n
        self._buf = torch.full((self.capacity, self._width), math.nan, dtype=dtype, device=device)
        self._nan_ratio = torch.full((n,), math.nan, dtype=dtype, device=device)
        self._steps: list[int] = []

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def full(self) -> bool:
        return len(self._steps) >= self.capacity

    @torch.no_grad()
    def record(
        self,
        step: int,
        *,
        global_norm: Tensor,
        per_tensor_norm: Tensor,
        loss: Tensor | float | None = None,
        threshold: Tensor | float = math.inf,
        clipped: Tensor | bool = False,
        skipped: Tensor | bool = False,
        lr_scale: Tensor | float = 1.0,
        update_ratio: Tensor | None = None,
    ) -> None:
        """Write one row. Device tensors are copied on the device; no host sync."""
        if self.full:
            raise RuntimeError(
                f"HistoryBuffer is full ({self.capacity} rows); call flush() before record()."
            )
        buf = self._buf
        dev, dt = buf.device, buf.dtype

        def col(v: Tensor | float | bool | None) -> Tensor:
            if isinstance(v, Tensor):
                return v.detach().reshape(()).to(device=dev, dtype=dt)
            # torch.full is a fill kernel on the device: no host-to-device copy per step.
            return torch.full((), math.nan if v is None else float(v), dtype=dt, device=dev)

        scalars = torch.stack([col(loss), col(global_norm), col(threshold), col(clipped),
                               col(skipped), col(lr_scale)])
        ratio = self._nan_ratio if update_ratio is None else update_ratio.detach().to(dev, dt)
        row = torch.cat([scalars, per_tensor_norm.detach().to(dev, dt), ratio])
        buf[len(self._steps)].copy_(row)
        self._steps.append(int(step))

    def flush(self) -> History:
        """Every pending row as a :class:`History`, with one host sync; the buffer empties."""
        hist = History(list(self.names))
        n = len(self._steps)
        if n == 0:
            return hist
        rows = self._buf[:n].tolist()  # [sync] one read-back per flush, by design
        k, m = len(SCALAR_FIELDS), len(self.names)
        hist.step = self._steps
        for j, f in enumerate(SCALAR_FIELDS):
            vals = [r[j] for r in rows]
            setattr(hist, f, [v == 1.0 for v in vals] if f in ("clipped", "skipped") else vals)
        hist.layer_norm = [r[k:k + m] for r in rows]
        hist.update_ratio = [r[k + m:] for r in rows]
        self._steps = []
        self._buf[:n].fill_(math.nan)
        return hist

    def state_dict(self) -> dict[str, Any]:
        """Pending rows (so a checkpoint taken between flushes loses nothing)."""
        n = len(self._steps)
        return {"names": list(self.names), "steps": list(self._steps), "rows": self._buf[:n].clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise ValueError(
                "the checkpoint's history was recorded for different parameters "
                f"({len(state['names'])} tensors) than this model's ({len(self.names)})."
            )
        steps = list(state["steps"])
        if len(steps) > self.capacity:
            raise ValueError(
                f"the checkpoint holds {len(steps)} pending rows but `capacity` is {self.capacity}."
            )
        self._buf.fill_(math.nan)
        if steps:
            self._buf[: len(steps)].copy_(state["rows"].to(self._buf.device, self._buf.dtype))
        self._steps = steps
