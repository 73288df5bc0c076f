"""Per-step records kept on the device, read back in batches.

:class:`HistoryBuffer` is the hot-path half: ``record()`` writes one row of device tensors into
preallocated device buffers with one ``_foreach_copy_`` (no host sync). ``flush()`` moves the
pending rows to the host in one read and returns a :class:`History`, the host-side, columnar half
that detectors, sinks and reports read. ``History`` also round-trips through JSON lines (what
:class:`gradguard.JSONLSink` writes and ``gradguard report RUN.jsonl`` reads).

Memory. A History holds compact columns from the standard library's :mod:`array` module (the core
imports only torch): the per-tensor gradient norms are float32, **4 bytes per (row, tensor)**; the
update/weight ratios are stored only on the rows where they were measured (once per flush
interval by default), another 4 bytes per (measured row, tensor); the per-step scalars cost a
few bytes per row, not per tensor. 5,000 tensors x 2,000 rows take ~41 MB (Python floats took
611 MiB). Scalar columns are float64 so a float64 model's loss and norm keep their precision.

Adding a per-step scalar column: append its name to :data:`SCALAR_FIELDS` (and to
:data:`BOOL_FIELDS` if it is a flag; give it a default in ``_DEFAULTS`` if "not recorded" is not
NaN). ``HistoryBuffer.record(step, ..., name=value)`` then takes it, ``History.name`` reads it,
and JSONL, ``tail`` and ``extend`` carry it, with no other change.
"""

from __future__ import annotations

import json
import math
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradguard._checks import check_int

__all__ = ["BOOL_FIELDS", "SCALAR_FIELDS", "History", "HistoryBuffer"]

#: Per-step scalar columns, in row order. NaN means "not recorded".
SCALAR_FIELDS = ("loss", "global_norm", "threshold", "clipped", "skipped", "lr_scale", "lr")
#: The scalar columns that are flags (read back as bools).
BOOL_FIELDS = frozenset({"clipped", "skipped"})
#: What a row holds when ``record`` is not given a column (NaN otherwise).
_DEFAULTS: dict[str, float] = {"threshold": math.inf, "clipped": 0.0, "skipped": 0.0, "lr_scale": 1.0}

_NAN = math.nan


def _default(field: str) -> float:
    return _DEFAULTS.get(field, _NAN)


# ---------------------------------------------------------------------------------------------
# host columns


class Column(Sequence):
    """One per-step column: a compact :class:`array.array` read as Python values.

    Indexing and iteration give ``int`` (``step``), ``bool`` (flags) or ``float``; slices give
    lists. ``append``/``extend`` and item assignment work as on a list, and a column compares
    equal to a list (or any sequence) with the same values.
    """

    __slots__ = ("_a", "_bool")

    def __init__(self, typecode: str, values: Iterable[Any] = (), *, is_bool: bool = False) -> None:
        self._a = array(typecode)
        self._bool = is_bool
        self.extend(values)

    def __len__(self) -> int:
        return len(self._a)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return list(self._a[i]) if not self._bool else [bool(v) for v in self._a[i]]
        v = self._a[i]
        return bool(v) if self._bool else v

    def __iter__(self) -> Iterator[Any]:
        return map(bool, self._a) if self._bool else iter(self._a)

    def __setitem__(self, i: int, v: Any) -> None:
        self._a[i] = self._coerce(v)

    def __delitem__(self, i: Any) -> None:
        del self._a[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Column, list, tuple, array)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(list(self))

    def _coerce(self, v: Any) -> Any:
        if self._a.typecode == "q":
            return int(v)
        if self._bool:
            return 1 if v and v == v else 0  # NaN ("not recorded") reads as False
        return _float(v)

    def append(self, v: Any) -> None:
        self._a.append(self._coerce(v))

    def extend(self, values: Iterable[Any]) -> None:
        if isinstance(values, Column) and values._a.typecode == self._a.typecode:
            self._a.extend(values._a)
        else:
            self._a.extend(self._coerce(v) for v in values)

    def tolist(self) -> list[Any]:
        return list(self)

    @property
    def nbytes(self) -> int:
        return self._a.itemsize * len(self._a)


class Matrix(Sequence):
    """A per-tensor column: one row of ``width`` float32 values per step, stored row-major.

    ``m[i]`` is a new list of floats (a copy: assign ``m[i] = row`` to change a row).

    ``sparse=True`` stores only the rows that were written with a value (``append(None)`` or an
    all-NaN row is "not measured": it costs nothing and reads back as NaN).
    """

    __slots__ = ("_flat", "_width", "_rows", "_sparse", "_where")

    def __init__(self, width: int, rows: Iterable[Sequence[float] | None] = (), *, sparse: bool = False) -> None:
        self._flat = array("f")
        self._width = width
        self._rows = 0
        self._sparse = sparse
        self._where = array("q")  # sparse: the row index of each stored row, increasing
        for r in rows:
            self.append(r)

    def __len__(self) -> int:
        return self._rows

    def _slot(self, i: int) -> int | None:
        """Where row ``i`` is stored (None: not measured)."""
        if not self._sparse:
            return i
        k = bisect_left(self._where, i)
        return k if k < len(self._where) and self._where[k] == i else None

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self._rows))]
        if i < 0:
            i += self._rows
        if not 0 <= i < self._rows:
            raise IndexError("row index out of range")
        slot = self._slot(i)
        if slot is None:
            return [_NAN] * self._width
        return self._flat[slot * self._width:(slot + 1) * self._width].tolist()

    def __setitem__(self, i: int, row: Sequence[float]) -> None:
        if i < 0:
            i += self._rows
        if not 0 <= i < self._rows:
            raise IndexError("row index out of range")
        if len(row) != self._width:
            raise ValueError(f"a row of this History has {self._width} values, got {len(row)}.")
        slot = self._slot(i)
        if slot is None:  # a sparse row measured after the fact: insert it in order
            k = bisect_left(self._where, i)
            self._where.insert(k, i)
            self._flat[k * self._width:k * self._width] = array("f", map(_float, row))
        else:
            self._flat[slot * self._width:(slot + 1) * self._width] = array("f", map(_float, row))

    def __iter__(self) -> Iterator[Sequence[float]]:
        for i in range(self._rows):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Matrix, list, tuple)):
            return len(self) == len(other) and all(
                len(a) == len(b) and all(x == y for x, y in zip(a, b)) for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Matrix({self._rows} rows x {self._width}{', sparse' if self._sparse else ''})"

    def __array__(self, dtype: Any = None, copy: Any = None) -> Any:
        import numpy as np  # only numpy itself calls this, so it is installed

        out = np.full((self._rows, self._width), np.nan, dtype=np.float32)
        stored = np.frombuffer(self._flat, dtype=np.float32).reshape(-1, self._width) if self._width else None
        if stored is not None and len(stored):
            if self._sparse:
                out[np.frombuffer(self._where, dtype=np.int64)] = stored
            else:
                out[:] = stored
        return out if dtype is None else out.astype(dtype)

    def append(self, row: Sequence[float] | None) -> None:
        if row is not None and len(row) != self._width:
            raise ValueError(f"a row of this History has {self._width} values (one per tensor), got {len(row)}.")
        if row is not None and not (self._sparse and all(math.isnan(v) for v in row)):
            if self._sparse:
                self._where.append(self._rows)
            self._flat.extend(_float(v) for v in row)
        elif not self._sparse:
            self._flat.extend([_NAN] * self._width)
        self._rows += 1

    def extend(self, other: Matrix) -> None:
        if other._width != self._width:
            raise ValueError(f"cannot join rows of {other._width} values to rows of {self._width}.")
        if self._sparse:
            self._where.extend(self._rows + w for w in (other._where if other._sparse else range(other._rows)))
        elif other._sparse:
            for r in other:
                self.append(r)
            return
        self._flat.extend(other._flat)
        self._rows += other._rows

    def _extend_tensor(self, block: Tensor, rows: int, where: Sequence[int] = ()) -> None:
        """Append ``rows`` rows from a CPU float32 block; ``where``: sparse rows' offsets."""
        start = len(self._flat)
        self._flat.frombytes(bytes(block.numel() * 4))
        if block.numel():
            dst = torch.frombuffer(self._flat, dtype=torch.float32, offset=start * 4, count=block.numel())
            dst.copy_(block.reshape(-1))
            del dst  # release the buffer export before the array may grow again
        if self._sparse:
            self._where.extend(self._rows + w for w in where)
        self._rows += rows

    def drop_first(self, n: int) -> None:
        """Delete the first ``n`` rows."""
        n = min(n, self._rows)
        if self._sparse:
            k = bisect_left(self._where, n)
            del self._flat[: k * self._width]
            self._where = array("q", (w - n for w in self._where[k:]))
        else:
            del self._flat[: n * self._width]
        self._rows -= n

    def tail(self, n: int) -> Matrix:
        out = Matrix(self._width, sparse=self._sparse)
        n = max(0, min(n, self._rows))
        first = self._rows - n
        if self._sparse:
            k = bisect_left(self._where, first)
            out._where = array("q", (w - first for w in self._where[k:]))
            out._flat = self._flat[k * self._width:]
        else:
            out._flat = self._flat[first * self._width:]
        out._rows = n
        return out

    @property
    def nbytes(self) -> int:
        return self._flat.itemsize * len(self._flat) + self._where.itemsize * len(self._where)


def _column(field: str) -> Column:
    return Column("b", is_bool=True) if field in BOOL_FIELDS else Column("d")


# ---------------------------------------------------------------------------------------------
class History:
    """Columnar, host-side history of guarded steps.

    Every column is a sequence with one entry per row: index it, iterate it, ``len()`` it,
    compare it to a list, ``append`` to it.

    Attributes:
        names: per-tensor column names (qualified parameter names, in module order).
        step: optimizer-step index of each row (ints).
        loss, global_norm, threshold, lr_scale: floats per row (NaN where not recorded;
            ``threshold`` is +inf where nothing clipped by norm), and any other name in
            :data:`SCALAR_FIELDS`.
        lr: the effective learning rate of the first param group (the scheduler's LR times
            ``lr_scale``) at each step; NaN where not recorded.
        clipped, skipped: bools per row.
        layer_norm: per row, the gradient norm of each named tensor (``len(names)`` float32
            values, read as a new list of floats: ``hist.layer_norm[i][j]``).
        update_ratio: per row, ``||Δw|| / ||w||`` of each named tensor, NaN where not measured;
            stored only on the rows where it was measured.
    """

    _COLUMNS = ("step", *SCALAR_FIELDS, "layer_norm", "update_ratio")

    def __init__(self, names: Sequence[str], **columns: Any) -> None:
        object.__setattr__(self, "names", list(names))
        object.__setattr__(self, "_cols", {})
        n = len(self.names)
        self._cols["step"] = Column("q")
        for f in SCALAR_FIELDS:
            self._cols[f] = _column(f)
        self._cols["layer_norm"] = Matrix(n)
        self._cols["update_ratio"] = Matrix(n, sparse=True)
        for k, v in columns.items():
            setattr(self, k, v)

    def __getattr__(self, name: str) -> Any:
        cols = self.__dict__.get("_cols")
        if cols is not None and name in cols:
            return cols[name]
        raise AttributeError(f"History has no column {name!r}; columns: {list(cols or ())}")

    def __setattr__(self, name: str, value: Any) -> None:
        cols = self.__dict__.get("_cols")
        if cols is None or name not in cols:
            object.__setattr__(self, name, value)
            return
        cur = cols[name]
        if isinstance(cur, Matrix):
            new = value if isinstance(value, Matrix) else Matrix(cur._width, value, sparse=cur._sparse)
        elif isinstance(value, Column):
            new = value
        else:
            new = _column(name) if name != "step" else Column("q")
            new.extend(value)
        cols[name] = new

    def __len__(self) -> int:
        return len(self._cols["step"])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, History):
            return NotImplemented
        return self.names == other.names and all(
            self._cols[k] == other._cols[k] for k in self._cols)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"History({len(self)} rows x {len(self.names)} tensors)"

    @property
    def nbytes(self) -> int:
        """Bytes held by the columns' values (the host memory this History costs)."""
        return sum(c.nbytes for c in self._cols.values())

    def extend(self, other: History, max_rows: int | None = None) -> None:
        """Append ``other``'s rows; keep at most the last ``max_rows`` rows."""
        if other.names != self.names:
            raise ValueError(
                "`other` has different tensor names than this History; histories of different "
                "models cannot be concatenated."
            )
        for k, col in self._cols.items():
            col.extend(other._cols[k])
        if max_rows is not None and len(self) > max_rows:
            drop = len(self) - max_rows
            for col in self._cols.values():
                if isinstance(col, Matrix):
                    col.drop_first(drop)
                else:
                    del col[:drop]

    def tail(self, n: int) -> History:
        """A new History with the last ``n`` rows."""
        out = History(self.names)
        for k, col in self._cols.items():
            if isinstance(col, Matrix):
                out._cols[k] = col.tail(n)
            else:
                out._cols[k].extend(col[-n:] if n > 0 else [])
        return out

    def layer_series(self, name: str) -> list[float]:
        """The gradient norm of tensor ``name`` at every row."""
        try:
            j = self.names.index(name)
        except ValueError:
            raise KeyError(
                f"no tensor named {name!r} in this History; known names: {self.names[:8]}"
            ) from None
        m = self._cols["layer_norm"]
        return list(m._flat[j::m._width]) if isinstance(m, Matrix) else [row[j] for row in m]

    # -- records (one dict per step) -------------------------------------------------------------
    def records(self) -> Iterator[dict[str, Any]]:
        """One plain dict per row: the scalar fields plus ``layer_norm``/``update_ratio`` dicts."""
        cols = self._cols
        for i in range(len(self)):
            rec: dict[str, Any] = {"step": cols["step"][i]}
            for f in SCALAR_FIELDS:
                rec[f] = cols[f][i]
            rec["layer_norm"] = dict(zip(self.names, cols["layer_norm"][i]))
            rec["update_ratio"] = dict(zip(self.names, cols["update_ratio"][i]))
            yield rec

    @classmethod
    def from_records(cls, records: Iterable[dict[str, Any]]) -> History:
        """Rebuild a History from :meth:`records` dicts (names from the first record)."""
        hist: History | None = None
        for rec in records:
            if hist is None:
                hist = cls(list(rec.get("layer_norm", {}).keys()))
            cols = hist._cols
            cols["step"].append(int(rec["step"]))
            for f in SCALAR_FIELDS:
                v = rec.get(f, _default(f))
                if f == "threshold" and v is None:  # JSONL's null: no norm threshold
                    v = math.inf
                cols[f].append(v)
            ln = rec.get("layer_norm", {})
            ur = rec.get("update_ratio", {})
            cols["layer_norm"].append([_float(ln.get(n, _NAN)) for n in hist.names])
            cols["update_ratio"].append([_float(ur.get(n, _NAN)) for n in hist.names])
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
        return _NAN
    return float(v)  # float("nan"), float("inf") and float("-inf") parse the string forms


def _detached(t: Tensor) -> Tensor:
    return t.detach() if t.requires_grad else t


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


# ---------------------------------------------------------------------------------------------
class HistoryBuffer:
    """Preallocated device buffers of per-step rows; ``record`` is sync-free, ``flush`` syncs once.

    Three buffers: the ``SCALAR_FIELDS`` of every row (in ``dtype``: float64 for a float64
    model), the per-tensor gradient norms (float32), and the update ratios of the rows that
    measured them (float32). ``record`` writes a row with one ``_foreach_copy_`` into views
    prepared here, so its cost does not grow with the number of columns.

    Args:
        names: per-tensor column names, in module order.
        capacity: rows held before a flush is due (``record`` raises when full).
        device: where the buffers live (the gradients' device).
        dtype: the dtype of the scalar columns on the device.
        ratio_capacity: rows with update ratios held before a flush is due (default:
            ``capacity``; the Guard passes how many its ``measure_updates`` can produce).
    """

    def __init__(
        self,
        names: Sequence[str],
        capacity: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        ratio_capacity: int | None = None,
    ) -> None:
        self.names = list(names)
        self.capacity = check_int("capacity", capacity, minimum=1)
        rcap = self.capacity if ratio_capacity is None else check_int(
            "ratio_capacity", ratio_capacity, minimum=0)
        n, k, cap = len(self.names), len(SCALAR_FIELDS), self.capacity
        self._scal = torch.full((cap, k), math.nan, dtype=dtype, device=device)
        self._norms = torch.full((cap, n), math.nan, dtype=torch.float32, device=device)
        self._ratio = torch.full((min(rcap, cap), n), math.nan, dtype=torch.float32, device=device)
        # Views written by record(): row i's scalars, its norms; ratio slot j.
        self._row_views = [list(self._scal[i].unbind(0)) + [self._norms[i]] for i in range(cap)]
        self._ratio_views = list(self._ratio.unbind(0))
        self._defaults = {f: torch.full((), _default(f), dtype=dtype, device=device) for f in SCALAR_FIELDS}
        self._steps: list[int] = []
        self._ratio_rows: list[int] = []  # pending rows (0-based in the chunk) with a ratio

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def full(self) -> bool:
        return len(self._steps) >= self.capacity

    def _grow_ratio(self, rows: int) -> None:
        """Room for ``rows`` rows of update ratios (more than ``ratio_capacity`` arrive only
        after a rollback rewinds the step counter within one flush interval)."""
        rows = min(max(rows, 2 * len(self._ratio_views)), self.capacity)
        old = self._ratio
        self._ratio = torch.full((rows, old.shape[1]), math.nan, dtype=old.dtype, device=old.device)
        self._ratio[: old.shape[0]].copy_(old)
        self._ratio_views = list(self._ratio.unbind(0))

    def _src(self, field: str, v: Tensor | float | bool | None) -> Tensor:
        if v is None:
            return self._defaults[field]
        if isinstance(v, Tensor):  # (detach and reshape are ops too: only where needed)
            v = _detached(v)
            return v if v.dim() == 0 else v.reshape(())
        # torch.full is a fill kernel on the device: no host-to-device copy per step.
        return torch.full((), float(v), dtype=self._scal.dtype, device=self._scal.device)

    @torch.no_grad()
    def record(
        self,
        step: int,
        *,
        global_norm: Tensor,
        per_tensor_norm: Tensor,
        update_ratio: Tensor | None = None,
        **scalars: Tensor | float | bool | None,
    ) -> None:
        """Write one row: ``global_norm``, the per-tensor norms, optionally the update ratios,
        and any other of :data:`SCALAR_FIELDS` by name (``loss=``, ``threshold=``, ``clipped=``,
        ``skipped=``, ``lr_scale=``; a missing one takes its default: NaN, or +inf for the
        threshold, False for flags, 1.0 for ``lr_scale``). Device tensors are copied on the
        device; no host sync."""
        if self.full:
            raise RuntimeError(
                f"HistoryBuffer is full ({self.capacity} rows); call flush() before record()."
            )
        unknown = set(scalars) - set(SCALAR_FIELDS)
        if unknown:
            raise TypeError(f"unknown history column(s) {sorted(unknown)}; columns: {SCALAR_FIELDS}")
        scalars["global_norm"] = global_norm
        i = len(self._steps)
        dst = self._row_views[i]
        src = [self._src(f, scalars.get(f)) for f in SCALAR_FIELDS]
        src.append(_detached(per_tensor_norm))
        if update_ratio is not None:
            if len(self._ratio_rows) >= len(self._ratio_views):
                self._grow_ratio(len(self._ratio_rows) + 1)
            dst = [*dst, self._ratio_views[len(self._ratio_rows)]]
            src.append(_detached(update_ratio))
            self._ratio_rows.append(i)
        torch._foreach_copy_(dst, src)
        self._steps.append(int(step))

    def flush(self) -> History:
        """Every pending row as a :class:`History`, with one host read; the buffer empties."""
        hist = History(self.names)
        n, m = len(self._steps), len(self._ratio_rows)
        if n == 0:
            return hist
        # [sync] one read-back per flush, by design: the per-tensor blocks are copied to the
        # host in bulk first, then the few scalars are read (on a GPU the first copy waits for
        # the stream; the second finds it idle).
        norms = self._norms[:n].to("cpu")
        ratio = self._ratio[:m].to("cpu")
        scal = self._scal[:n].tolist()
        cols = hist._cols
        cols["step"].extend(self._steps)
        for j, f in enumerate(SCALAR_FIELDS):
            cols[f].extend(r[j] for r in scal)
        cols["layer_norm"]._extend_tensor(norms, n)
        cols["update_ratio"]._extend_tensor(ratio, n, self._ratio_rows)
        self._steps, self._ratio_rows = [], []
        self._scal[:n].fill_(math.nan)
        return hist

    def state_dict(self) -> dict[str, Any]:
        """Pending rows (so a checkpoint taken between flushes loses nothing)."""
        n, m = len(self._steps), len(self._ratio_rows)
        return {"names": list(self.names), "steps": list(self._steps), "fields": list(SCALAR_FIELDS),
                "scalars": self._scal[:n].clone(), "norms": self._norms[:n].clone(),
                "ratio_rows": list(self._ratio_rows), "ratios": self._ratio[:m].clone()}

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
        n = len(steps)
        if "rows" in state:  # gradguard 0.1: one row = scalars, norms, ratios (NaN: unmeasured)
            rows = state["rows"]
            fields = ["loss", "global_norm", "threshold", "clipped", "skipped", "lr_scale"]
            k, w = len(fields), len(self.names)
            old_scalars, norms, full_ratio = rows[:, :k], rows[:, k:k + w], rows[:, k + w:]
            ratio_rows = [i for i in range(n) if not bool(torch.isnan(full_ratio[i]).all())]
            ratios = full_ratio[ratio_rows] if ratio_rows else full_ratio[:0]
        else:
            fields, old_scalars = list(state["fields"]), state["scalars"]
            norms, ratio_rows, ratios = state["norms"], list(state["ratio_rows"]), state["ratios"]
        if fields != list(SCALAR_FIELDS):  # saved by a version with other columns: map by name
            idx = [fields.index(f) if f in fields else None for f in SCALAR_FIELDS]
            scalars = torch.stack([
                old_scalars[:, j] if j is not None else torch.full((n,), _default(f), dtype=old_scalars.dtype)
                for j, f in zip(idx, SCALAR_FIELDS)], 1) if n else old_scalars.new_zeros((0, len(SCALAR_FIELDS)))
        else:
            scalars = old_scalars
        self._scal.fill_(math.nan)
        self._norms.fill_(math.nan)
        self._ratio.fill_(math.nan)
        if n:
            self._scal[:n].copy_(scalars.to(self._scal.device, self._scal.dtype))
            self._norms[:n].copy_(norms.to(self._norms.device, torch.float32))
        if ratio_rows:
            self._grow_ratio(len(ratio_rows))
            self._ratio[: len(ratio_rows)].copy_(ratios.to(self._ratio.device, torch.float32))
        self._steps = steps
        self._ratio_rows = ratio_rows
