"""Where flushed history goes: JSON lines, CSV, TensorBoard, Weights & Biases, MLflow, or any
callable.

A sink is any callable taking a :class:`~gradguard.history.History` chunk (the rows of one flush);
it may also have ``close()``. Sinks run on the host, every ``flush_every`` steps, never per step.
The W&B and MLflow sinks import their package only when created (``pip install
"gradguard[wandb]"`` / ``"gradguard[mlflow]"``); both log the charts of :func:`chart_rows`.
The JSONL format is described in ``docs/jsonl.md``.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from gradguard._checks import check_int, require
from gradguard.history import SCALAR_FIELDS, History

__all__ = ["CSVSink", "JSONLSink", "MLflowSink", "Sink", "TensorBoardSink", "WandbSink",
           "chart_rows", "group_of"]

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

    ``histogram_every=k`` (0, the default, is off) adds, every k-th flush, one histogram per
    tensor, ``grad_norm_hist/<name>``, of that tensor's gradient norms over the flushed steps
    (TensorBoard's Histograms and Distributions tabs): how each layer's norm spread over the
    window, not only its last value. Non-finite norms are left out of a histogram.
    """

    def __init__(self, log_dir: str | Path, *, per_layer: bool | str = "auto",
                 histogram_every: int = 0, writer: Any | None = None) -> None:
        self.histogram_every = check_int("histogram_every", histogram_every, minimum=0,
                                         fix="k > 0 writes histograms every k flushes; 0 is off.")
        if writer is None:
            require("tensorboard", "tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(log_dir))
        self.writer = writer
        self.per_layer = per_layer
        self._flushes = 0

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
        self._flushes += 1
        if self.histogram_every and len(chunk) and self._flushes % self.histogram_every == 0:
            self._histograms(chunk)
        self.writer.flush()

    def _histograms(self, chunk: History) -> None:
        import torch

        norms = torch.tensor(chunk.layer_norm, dtype=torch.float64)  # rows x tensors, host
        for j, name in enumerate(chunk.names):
            col = norms[:, j]
            col = col[torch.isfinite(col)]
            if col.numel():
                self.writer.add_histogram(f"grad_norm_hist/{name}", col, chunk.step[-1])

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Log each flushed chunk to Weights & Biases (``pip install "gradguard[wandb]"``).

    Works online and in W&B's offline mode (``WANDB_MODE=offline`` or
    ``wandb.init(mode="offline")``; sync later with ``wandb sync``). The charts are those of
    :func:`chart_rows` under ``gradguard/``, plotted against their own x-axis
    ``gradguard/step`` (the Guard's step), so they never clash with the step counter of the
    user's own ``run.log`` calls.

    Args:
        run: the W&B run to log to; None: the active one (``wandb.run``), which must exist by
            the first flush (call ``wandb.init`` first).
        per_layer: per-layer norm charts: True, False, or "auto" (per tensor up to 16 tensors,
            else per block or module).
        norm_type: how per-tensor norms combine into a block's norm under "auto".
    """

    def __init__(self, run: Any | None = None, *, per_layer: bool | str = "auto",
                 norm_type: float = 2.0) -> None:
        self._wandb = require("wandb", "wandb")
        self._run = run
        self.per_layer = per_layer
        self.norm_type = norm_type
        self._defined: set[int] = set()

    @property
    def run(self) -> Any:
        run = self._run if self._run is not None else self._wandb.run
        if run is None:
            raise RuntimeError(
                "WandbSink has no run to log to: call wandb.init(...) before training (add "
                'mode="offline" to log without a network), or pass run=wandb.init(...).'
            )
        return run

    def __call__(self, chunk: History) -> None:
        run = self.run
        if id(run) not in self._defined:
            run.define_metric("gradguard/step")
            run.define_metric("gradguard/*", step_metric="gradguard/step")
            self._defined.add(id(run))
        for step, metrics in chart_rows(chunk, self.per_layer, norm_type=self.norm_type):
            run.log({"gradguard/step": step, **metrics})


class MLflowSink:
    """Log each flushed chunk to MLflow (``pip install "gradguard[mlflow]"``).

    One ``log_batch`` call per flush, into the given run or the active one
    (``mlflow.start_run()``); works with any tracking store, a local ``file:`` folder
    included. The metrics are those of :func:`chart_rows` under ``gradguard/``, at the Guard's
    step; non-finite values are left out (MLflow's stores differ on NaN and Inf; the skip and
    the history keep them).

    Args:
        run_id: the MLflow run to log to; None: the active run at each flush.
        tracking_uri: the tracking URI for the client (None: MLflow's current one).
        per_layer, norm_type: as for :class:`WandbSink`.
    """

    def __init__(self, run_id: str | None = None, *, tracking_uri: str | None = None,
                 per_layer: bool | str = "auto", norm_type: float = 2.0) -> None:
        self._mlflow = require("mlflow", "mlflow")
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.per_layer = per_layer
        self.norm_type = norm_type
        self._client: Any = None

    def __call__(self, chunk: History) -> None:
        mlflow = self._mlflow
        run_id = self.run_id
        if run_id is None:
            active = mlflow.active_run()
            if active is None:
                raise RuntimeError(
                    "MLflowSink has no run to log to: call mlflow.start_run() before training, "
                    "or pass run_id=..."
                )
            run_id = active.info.run_id
        if self._client is None:
            self._client = mlflow.tracking.MlflowClient(tracking_uri=self.tracking_uri)
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(v), now, step)
                   for step, row in chart_rows(chunk, self.per_layer, norm_type=self.norm_type)
                   for key, v in row.items() if math.isfinite(v)]
        for k in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self._client.log_batch(run_id, metrics=metrics[k:k + 1000])


def group_of(name: str) -> str:
    """The chart a tensor's norm is folded into when there are too many tensors for one each.

    Up to the first numeric component (a block of a ModuleList/Sequential:
    ``"transformer.h.3.attn.c_attn.weight"`` -> ``"transformer.h.3"``), else the owning module
    (``"encoder.norm.weight"`` -> ``"encoder.norm"``), else the name itself.
    """
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) if len(parts) > 1 else name


def chart_rows(
    chunk: History, per_layer: bool | str, prefix: str = "gradguard/", norm_type: float = 2.0,
    max_auto: int = 16,
) -> list[tuple[int, dict[str, float]]]:
    """One ``(step, {chart: value})`` per row of ``chunk``, for a framework's logger.

    Charts: ``global_norm``, ``threshold`` (where finite), ``clipped``, ``skipped``, ``loss``
    (where recorded), plus per-layer norms: ``per_layer=True`` one chart per tensor
    (``grad_norm/<name>``); ``"auto"`` one per tensor up to ``max_auto`` tensors, else one per
    block or module (:func:`group_of`; the ``norm_type``-norm of its tensors' norms); ``False``
    none. Non-finite values are logged as they are: a NaN norm is information.
    """
    names = chunk.names
    grouped = per_layer == "auto" and len(names) > max_auto
    groups: dict[str, list[int]] = {}
    if grouped:
        for j, n in enumerate(names):
            groups.setdefault(group_of(n), []).append(j)
    rows = []
    for i, step in enumerate(chunk.step):
        m: dict[str, float] = {f"{prefix}global_norm": chunk.global_norm[i],
                               f"{prefix}clipped": float(chunk.clipped[i]),
                               f"{prefix}skipped": float(chunk.skipped[i])}
        thr = chunk.threshold[i]
        if not math.isnan(thr) and not math.isinf(thr):
            m[f"{prefix}threshold"] = thr
        if not math.isnan(chunk.loss[i]):
            m[f"{prefix}loss"] = chunk.loss[i]
        layer = chunk.layer_norm[i]
        if grouped:
            for g, idx in groups.items():
                m[f"{prefix}grad_norm/{g}"] = _combine((layer[j] for j in idx), norm_type)
        elif per_layer:
            for n, v in zip(names, layer):
                m[f"{prefix}grad_norm/{n}"] = v
        rows.append((step, m))
    return rows


def _combine(norms: Iterable[float], p: float) -> float:
    vals = list(norms)
    if p == math.inf:
        return max(vals)
    return math.fsum(v ** p for v in vals) ** (1.0 / p)


def call_sinks(sinks: list[Callable[[History], None]], chunk: History) -> None:
    """Hand ``chunk`` to every sink; a failing sink is logged and does not stop training."""
    for sink in sinks:
        try:
            sink(chunk)
        except Exception:  # a broken logger must not kill a long training run
            log.exception("gradguard sink %r failed; continuing without it for this flush", sink)
