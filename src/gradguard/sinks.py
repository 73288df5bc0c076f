"""Where flushed history goes: JSON lines, CSV, TensorBoard, or any callable.

A sink is any callable taking a :class:`~gradguard.history.History` chunk (the rows of one flush);
it may also have ``close()``. Sinks run on the host, every ``flush_every`` steps, never per step.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from gradguard.history import SCALAR_FIELDS, History

__all__ = ["CSVSink", "JSONLSink", "Sink", "TensorBoardSink"]

log = logging.getLogger(__name__)


@runtime_checkable
class Sink(Protocol):
    """Anything called with each flushed :class:`History` chunk."""

    def __call__(self, chunk: History) -> None: ...


class JSONLSink:
    """Append one JSON object per step to ``path`` (read back with ``History.from_jsonl``).

    The file is truncated when the sink is created unless ``append=True``.
    """

    def __init__(self, path: str | Path, *, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not append:
            self.path.write_text("", encoding="utf-8")

    def __call__(self, chunk: History) -> None:
        chunk.to_jsonl(self.path, append=True)


class CSVSink:
    """Append one row per step to ``path``: the scalar fields, then ``norm/<name>`` per tensor."""

    def __init__(self, path: str | Path, *, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._header_written = append and self.path.exists() and self.path.stat().st_size > 0
        if not append:
            self.path.write_text("", encoding="utf-8")

    def __call__(self, chunk: History) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            if not self._header_written:
                w.writerow(["step", *SCALAR_FIELDS, *(f"norm/{n}" for n in chunk.names)])
                self._header_written = True
            for i in range(len(chunk)):
                scal = [getattr(chunk, fld)[i] for fld in SCALAR_FIELDS]
                scal = [int(v) if isinstance(v, bool) else v for v in scal]
                w.writerow([chunk.step[i], *scal, *chunk.layer_norm[i]])


class TensorBoardSink:
    """Write scalars to a TensorBoard event file (needs ``pip install tensorboard``).

    Charts: ``gradguard/global_norm``, ``/loss``, ``/threshold``, ``/clipped``, ``/skipped``,
    ``/lr_scale``; with ``per_layer=True`` also ``grad_norm/<name>`` for every tensor (one chart per
    tensor, so off by default for big models: ``per_layer="auto"`` turns it on up to 64 tensors).
    """

    def __init__(self, log_dir: str | Path, *, per_layer: bool | str = "auto",
                 writer: Any | None = None) -> None:
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ModuleNotFoundError(
                    "TensorBoardSink needs the `tensorboard` package: pip install 'gradguard[tensorboard]'"
                ) from e
            writer = SummaryWriter(log_dir=str(log_dir))
        self.writer = writer
        self.per_layer = per_layer

    def __call__(self, chunk: History) -> None:
        per_layer = self.per_layer if self.per_layer != "auto" else len(chunk.names) <= 64
        for i, step in enumerate(chunk.step):
            for fld in SCALAR_FIELDS:
                v = float(getattr(chunk, fld)[i])
                if math.isnan(v):
                    continue
                self.writer.add_scalar(f"gradguard/{fld}", v, step)
            if per_layer:
                for name, v in zip(chunk.names, chunk.layer_norm[i]):
                    self.writer.add_scalar(f"grad_norm/{name}", v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def call_sinks(sinks: list[Callable[[History], None]], chunk: History) -> None:
    """Hand ``chunk`` to every sink; a failing sink is logged and does not stop training."""
    for sink in sinks:
        try:
            sink(chunk)
        except Exception:  # a broken logger must not kill a long training run
            log.exception("gradguard sink %r failed; continuing without it for this flush", sink)
