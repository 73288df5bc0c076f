"""Shared by every detector family: the thresholds, the per-layer view of a history, the context
each detector reads, and small robust-statistics helpers.

The thresholds are module constants, named and documented here; ``docs/doctor.md`` lists them
with the reasoning behind each.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from gradguard.doctor.probes import HARD_ZERO, ProbeSummary, SiteStats, TemporalStats
from gradguard.history import History


# -- thresholds ----------------------------------------------------------------------------------
#: vanishing: the first weight layer's gradient is this far below the best-fed later layer.
VANISH_RATIO = 1e-2
#: ...and error severity below this.
VANISH_ERROR = 1e-4
#: a layer is named when its gradient is this far below the best-fed later layer.
NAME_RATIO = 1e-1
#: exploding across depth: the first layer's gradient this far above the weakest later layer.
EXPLODE_RATIO = 1e2
#: exploding over time: the global norm grows this much above its early median...
EXPLODE_GROWTH = 1e2
#: ...and stays at least this much above it at the end of the window.
EXPLODE_SUSTAIN = 1e1
#: temporal (recurrent) vanishing/exploding: gradient at the first time step over the last's.
TIME_VANISH = 1e-3
TIME_EXPLODE = 1e1  # healthy recurrent layers (any cell, any sane init) decay backward in time
#: a recurrent profile needs at least this many time steps to be judged.
TIME_MIN_STEPS = 8
#: saturation: share of a site's outputs pinned near a bound.
SATURATED_FRAC = 0.3
SATURATED_ERROR = 0.6
#: dead units: share of a ReLU site's units that are dead (positive on < 1% of the samples).
#: Half: a healthy 16-layer, 32-wide He-initialised ReLU net showed 44% in one deep layer at init.
DEAD_FRAC = 0.5
DEAD_ERROR = 0.8
DEAD_MIN_UNITS = 4
#: activation scale drift: last/first RMS of weight-layer outputs, in orders of magnitude.
DRIFT_DECADES = 2.0
DRIFT_MIN_LAYERS = 4
#: learning rate too high: median update/weight ratio (CS231n: ~1e-3 is healthy).
LR_UPDATE_RATIO = 1e-2
#: training stalled: loss changes by less than this share and updates are below STALL_UPDATE.
STALL_LOSS_CHANGE = 0.01
STALL_UPDATE = 1e-4
#: loss spike: robust z-score against the trailing window, and the loss ratio to its median.
SPIKE_Z = 6.0
SPIKE_RATIO = 2.0
SPIKE_NORM_RATIO = 10.0
SPIKE_WINDOW = 10
#: time-based detectors need this many recorded steps.
MIN_ROWS = 8
#: loss divergence: the loss's level rose this many times above where it was, and stayed.
DIVERGE_FACTOR = 2.0
#: a loss summed over the batch: a whole batch's loss over half a batch's, within this range.
SUM_RATIO = (1.6, 2.6)
#: exploding at the starting weights: the output of the weight layers grows this much (RMS)
#: from the first to the last, along a rising trend (a forward blow-up; scale-free in the loss).
FORWARD_GROWTH = 30.0
#: an LSTM's forget gate counts as closed when its mean bias is below this (sigmoid(-1) = 0.27).
CLOSED_GATE_BIAS = -1.0

CODES = (
    "loss_scale",
    "nonfinite_loss",
    "nonfinite_gradients",
    "exploding_gradients",
    "vanishing_gradients",
    "saturated_activations",
    "dead_units",
    "activation_scale_drift",
    "learning_rate_too_high",
    "loss_divergence",
    "loss_spike",
    "training_stalled",
)


#: every cause code a detector may name (each has text in gradguard.messages)
CAUSES = (
    "saturating_activation", "depth", "small_init", "large_init", "high_learning_rate",
    "low_learning_rate", "recurrence", "missing_normalization", "numerical_overflow",
    "dying_relu", "bad_bias_init", "outlier_batch", "half_precision", "unscaled_data",
    "summed_loss", "closed_forget_gate",
)


#: every remedy code a detector may prescribe (each has text; most have a treatment to try)
REMEDIES = (
    "relu_family", "he_init", "xavier_init", "orthogonal_init", "batch_norm",
    "residual_connections", "gradient_clipping", "lower_learning_rate", "raise_learning_rate",
    "lr_schedule", "adaptive_optimizer", "gated_recurrence", "weight_decay",
    "skip_nonfinite_steps", "spike_skipping", "leaky_relu", "stable_loss", "layer_norm", "pre_ln",
    "forget_gate_bias", "fp32_logits", "standardize_data", "mean_reduction",
)


_NORM_TOKEN = re.compile(r"(^|[._])(bn|ln|gn|norm|batchnorm|layernorm|groupnorm|rmsnorm)\w*$",
                         re.IGNORECASE)


_NORM_TYPES = re.compile(r"Norm", re.IGNORECASE)
#: layers judged by rules of their own: only the batch's rows of an embedding get a gradient, so
#: its norm says nothing about depth (and a tied embedding/head sums two roles' gradients)
_EMBEDDING_TYPES = ("Embedding", "EmbeddingBag")
_EMBEDDING_NAME = re.compile(r"(^|[._])(emb|embed|embeds|embedding|embeddings|wte|wpe|"
                             r"tok_embeddings|word_embeddings|position_embeddings|encoder)$",
                             re.IGNORECASE)


def _layer_of(name: str) -> str:
    """The module owning a parameter; a parameter of the root module is its own layer."""
    return name.rsplit(".", 1)[0] if "." in name else name


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _is_bias(name: str) -> bool:
    leaf = _leaf(name)
    return leaf == "bias" or leaf.startswith("bias_")


def _median(xs: Sequence[float]) -> float:
    vals = [x for x in xs if math.isfinite(x)]
    return statistics.median(vals) if vals else math.nan


def _theil_sen(ys: Sequence[float]) -> float:
    """Robust slope of ys against their index (median of pairwise slopes)."""
    n = len(ys)
    slopes = [(ys[j] - ys[i]) / (j - i) for i in range(n) for j in range(i + 1, n)]
    return statistics.median(slopes) if slopes else 0.0


def _monotone_share(ys: Sequence[float], sign: int) -> float:
    """Share of consecutive differences with the given sign."""
    d = [b - a for a, b in zip(ys, ys[1:])]
    return sum(1 for x in d if x * sign > 0) / len(d) if d else 0.0


def _sig(x: float, digits: int = 3) -> float:
    """Round for evidence (keeps JSON short; exact values are not the point)."""
    if not math.isfinite(x) or x == 0:
        return x
    return round(x, -int(math.floor(math.log10(abs(x)))) + digits - 1)


@dataclass
class LayerView:
    """A history seen per layer (a module owning parameters), in depth order.

    Attributes:
        layers: every layer, in depth order (forward order when a probe saw it, else module order).
        weight_layers: the layers used for depth profiles (matrices/kernels; no norm layers).
        module_rank: each layer's position in module (parameter) order, for naming.
        norms: per row, each layer's gradient norm (root of the sum of its tensors' squares).
        update: per row, each layer's update/weight ratio (NaN where not measured).
        weight_norm: each layer's parameter norm (NaN without a probe summary).
        layer_type: each layer's module class ("" without a probe summary).
    """

    layers: list[str]
    weight_layers: list[str]
    module_rank: dict[str, int]
    norms: list[list[float]]
    update: list[list[float]]
    weight_norm: dict[str, float] = field(default_factory=dict)
    layer_type: dict[str, str] = field(default_factory=dict)

    def col(self, layer: str) -> list[float]:
        j = self.layers.index(layer)
        return [r[j] for r in self.norms]

    def in_module_order(self, names: Sequence[str]) -> list[str]:
        return sorted(set(names), key=lambda n: self.module_rank.get(n, 1 << 30))


def layer_view(history: History, probes: ProbeSummary | None = None) -> LayerView:
    """Aggregate per-tensor columns into per-layer ones, in depth order."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(history.names):
        groups.setdefault(_layer_of(name), []).append(i)
    rank = {layer: k for k, layer in enumerate(groups)}
    info = {p.name: p for p in probes.params} if probes is not None else {}
    order = list(groups)
    if probes is not None and probes.module_order:
        seen = [m for m in probes.module_order if m in groups]
        order = seen + [m for m in groups if m not in seen]
    weight_layers = []
    layer_type: dict[str, str] = {}
    weight_norm: dict[str, float] = {}
    for layer in order:
        idx = groups[layer]
        names = [history.names[i] for i in idx]
        if info and all(n in info for n in names):
            infos = [info[n] for n in names]
            layer_type[layer] = infos[0].module_type
            weight_norm[layer] = math.sqrt(sum(p.norm ** 2 for p in infos))
            is_weight = (any(len(p.shape) >= 2 for p in infos)
                         and not _NORM_TYPES.search(infos[0].module_type)
                         and infos[0].module_type not in _EMBEDDING_TYPES
                         and not any(p.shared_with for p in infos))
        else:
            leaf = _leaf(layer) if layer else ""
            is_weight = (any(not _is_bias(n) for n in names) and not _NORM_TOKEN.search(leaf)
                         and not _EMBEDDING_NAME.search(leaf))
        if is_weight:
            weight_layers.append(layer)
    matrix_idx = {i for i, name in enumerate(history.names)
                  if (len(info[name].shape) >= 2 if name in info else not _is_bias(name))}
    norms, update = [], []
    for r, u in zip(history.layer_norm, history.update_ratio):
        row, urow = [], []
        for layer in order:
            vals = [r[i] for i in groups[layer]]
            row.append(math.sqrt(sum(v * v for v in vals)) if all(
                math.isfinite(v) for v in vals) else (math.nan if any(
                    math.isnan(v) for v in vals) else math.inf))
            # biases start at zero, so their ratio is meaningless early on: weights only
            us = [u[i] for i in groups[layer] if math.isfinite(u[i]) and i in matrix_idx]
            if not us:
                us = [u[i] for i in groups[layer] if math.isfinite(u[i])]
            urow.append(statistics.median(us) if us else math.nan)
        norms.append(row)
        update.append(urow)
    return LayerView(order, weight_layers, rank, norms, update, weight_norm, layer_type)


@dataclass
class _Ctx:
    hist: History
    probes: ProbeSummary | None
    view: LayerView
    finite_rows: list[int]
    first_bad_row: int | None  # first row with a non-finite gradient or loss

    @property
    def n(self) -> int:
        return len(self.hist)

    @property
    def trained(self) -> bool:
        """Whether updates were measured (an optimizer ran)."""
        return any(math.isfinite(x) for row in self.view.update for x in row)

    def sites(self, kind: str) -> list[SiteStats]:
        if self.probes is None:
            return []
        return [s for s in self.probes.sites if s.kind == kind and not s.is_output]

    def initial(self) -> ProbeSummary | None:
        """The probe window nearest the initial weights (init-scale questions are read there)."""
        if self.probes is None:
            return None
        return self.probes.initial if self.probes.initial is not None else self.probes

    def temporal(self) -> list[TemporalStats]:
        src = self.initial()
        return src.temporal if src is not None and src.temporal else (
            self.probes.temporal if self.probes is not None else [])

    def dead_sites(self) -> list[SiteStats]:
        return [s for s in self.sites("relu") if s.op in HARD_ZERO and s.units >= DEAD_MIN_UNITS
                and math.isfinite(s.dead) and s.dead > DEAD_FRAC and not s.nonfinite]

    def dominant_activation(self) -> str:
        """``"relu"``, ``"saturating"`` or ``"none"``: the hidden activations' family."""
        sat, relu = len(self.sites("saturating")), len(self.sites("relu"))
        if sat == relu == 0:
            return "none"
        return "saturating" if sat > relu else "relu"

    def has_norm_layers(self) -> bool:
        return any(_NORM_TYPES.search(t) for t in self.view.layer_type.values())

    def init_remedy(self) -> str:
        return "xavier_init" if self.dominant_activation() == "saturating" else "he_init"

    def drift(self) -> tuple[float, list[str], list[float]]:
        """(log10 last/first RMS, layers, rms) of weight-layer outputs in forward order."""
        src = self.initial()
        if src is None:
            return 0.0, [], []
        wl = set(self.view.weight_layers)
        layer_sites = [s for s in src.sites if s.kind == "layer" and s.module in wl
                       and s.op not in ("Embedding", "RNN", "LSTM", "GRU", "EmbeddingBag")]
        layer_sites = [s for s in layer_sites if math.isfinite(s.rms) and s.rms > 0]
        if len(layer_sites) < DRIFT_MIN_LAYERS:
            return 0.0, [], []
        # the output layer maps to the loss's scale; depth trends are read on hidden layers
        hidden = layer_sites[:-1] if len(layer_sites) > DRIFT_MIN_LAYERS else layer_sites
        rms = [s.rms for s in hidden]
        return math.log10(rms[-1] / rms[0]), [s.module for s in hidden], rms


def _profile(ctx: _Ctx, rows: Sequence[int]) -> tuple[list[str], list[float]]:
    """Median gradient norm of each weight layer over ``rows``, in depth order."""
    view = ctx.view
    out_l, out_v = [], []
    for layer in view.weight_layers:
        j = view.layers.index(layer)
        v = _median([view.norms[i][j] for i in rows])
        if math.isfinite(v):
            out_l.append(layer)
            out_v.append(v)
    return out_l, out_v


def _early_rows(ctx: _Ctx) -> list[int]:
    """Finite rows before anything went non-finite (all finite rows if nothing did)."""
    stop = ctx.first_bad_row if ctx.first_bad_row is not None else ctx.n
    return [i for i in ctx.finite_rows if i < stop]


def _rel_grad(ctx: _Ctx) -> float:
    """Median over weight layers of gradient norm / weight norm on the first finite row."""
    rows = _early_rows(ctx)
    if not rows or not ctx.view.weight_norm:
        return math.nan
    i = rows[0]
    vals = []
    for layer in ctx.view.weight_layers:
        w = ctx.view.weight_norm.get(layer, math.nan)
        g = ctx.view.norms[i][ctx.view.layers.index(layer)]
        if w > 0 and math.isfinite(g):
            vals.append(g / w)
    return _median(vals)


def _loss_recorded(ctx: _Ctx) -> bool:
    """NaN also means "not recorded": a loss column counts if some value is not NaN, or if the
    caller said every loss was recorded."""
    if ctx.probes is not None and ctx.probes.loss_recorded:
        return True
    return any(not math.isnan(v) for v in ctx.hist.loss)


def _growth_before(ctx: _Ctx, row: int) -> float:
    """Largest finite global norm before ``row`` over the median of the first few rows."""
    gn = [v for v in ctx.hist.global_norm[:row] if math.isfinite(v)]
    if len(gn) < 3:
        return math.nan
    early = _median(gn[: max(3, len(gn) // 5)])
    return max(gn) / early if early > 0 else math.nan


@dataclass
class _Trend:
    first: float  # mean of the first quarter of the finite losses
    last: float  # mean of the last quarter
    start: float  # the lowest of the first three losses (the loss at the initial weights)
    noise: float  # standard error of last - first (batch-to-batch noise)
    flips: float  # share of sign changes between consecutive differences


def _loss_trend(ctx: _Ctx) -> _Trend | None:
    loss = [v for v in ctx.hist.loss if math.isfinite(v)]
    if len(loss) < MIN_ROWS:
        return None
    q = max(2, len(loss) // 4)
    a, b = loss[:q], loss[-q:]
    noise = math.sqrt(statistics.variance(a) / q + statistics.variance(b) / q)
    d = [y - x for x, y in zip(loss, loss[1:])]
    flips = sum(1 for x, y in zip(d, d[1:]) if x * y < 0) / max(1, len(d) - 1)
    return _Trend(statistics.mean(a), statistics.mean(b), min(loss[:3]), noise, flips)


def _dedupe(xs: Sequence[str]) -> list[str]:
    out: list[str] = []
    for x in xs:
        if x not in out:
            out.append(x)
    return out
