"""Forward-pass probes: saturation, dead units and activation scale, per layer, on the device.

A :class:`Probe` is a context manager that hooks every module of a model. While it is active it
accumulates, on the device and without any host sync, for every *site* (an activation module, an
activation function called inside a module's ``forward``, or a parameterised layer):

* **saturation** (sigmoid, tanh, hardtanh, hardsigmoid, softsign): the fraction of outputs pinned
  near a bound, i.e. where the local derivative is below 5% of the function's peak derivative
  (sigmoid: ``|z| > 4.37``; tanh: ``|y| > 0.975``);
* **dead units** (ReLU family): for each unit (feature, or channel after a convolution), the share
  of sampled outputs where it was positive; a unit positive on fewer than ``DEAD_ACTIVE`` (1%) of
  them is dead (it passes gradient on almost no example), and the dead fraction is the share of
  such units;
* **scale**: the RMS of the output, and whether any output was non-finite.

Activations called as functions (``torch.sigmoid(x)``, ``F.relu(x)``, ``x.tanh()`` inside
``forward``) are seen through a :class:`~torch.overrides.TorchFunctionMode` that attributes each
call to the module whose ``forward`` is running. Recurrent modules (``nn.RNN``, ``nn.GRU``,
``nn.LSTM``) also get a **temporal** probe: the norm of the gradient that reaches each time step of
their input, which shows gradients vanishing or exploding through time.

:meth:`Probe.summary` reads everything back with one host sync and returns a
:class:`ProbeSummary` (plain Python numbers) for :mod:`gradguard.doctor.detectors`. Hooks are removed when
the ``with`` block ends, also on an exception.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "ParamInfo",
    "Probe",
    "ProbeSummary",
    "SiteStats",
    "TemporalStats",
    "activation_kind",
    "param_infos",
    "structure_summary",
]

#: A unit counts as "pinned" where the activation's derivative is below this share of its peak.
PINNED_DERIVATIVE = 0.05
#: A ReLU unit is dead when it is positive on fewer than this share of the sampled outputs.
DEAD_ACTIVE = 0.01

_SATURATING_MODULES: dict[type[nn.Module], str] = {
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.Hardtanh: "hardtanh",
    nn.Hardsigmoid: "hardsigmoid",
    nn.Softsign: "softsign",
}
_RELU_MODULES: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu",
    nn.PReLU: "prelu",
    nn.RReLU: "rrelu",
    nn.ELU: "elu",
    nn.CELU: "celu",
    nn.SELU: "selu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Mish: "mish",
}
# Note: nn.Hardtanh is the base class of nn.ReLU6; exact type lookups keep them apart.

_SATURATING_FUNCS: dict[Callable[..., Any], str] = {
    torch.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.sigmoid: "sigmoid",
    F.tanh: "tanh",
    F.hardtanh: "hardtanh",
    F.hardsigmoid: "hardsigmoid",
    F.softsign: "softsign",
    Tensor.sigmoid: "sigmoid",
    Tensor.tanh: "tanh",
    torch.special.expit: "sigmoid",
}
_RELU_FUNCS: dict[Callable[..., Any], str] = {
    torch.relu: "relu",
    F.relu: "relu",
    F.relu6: "relu6",
    F.leaky_relu: "leaky_relu",
    F.elu: "elu",
    F.selu: "selu",
    F.celu: "celu",
    F.gelu: "gelu",
    F.silu: "silu",
    F.mish: "mish",
    Tensor.relu: "relu",
}
#: ReLU-family ops whose negative side has exactly zero gradient: a never-positive unit is dead.
HARD_ZERO = frozenset({"relu", "relu6"})


def activation_kind(op: str) -> str:
    """``"saturating"``, ``"relu"`` or ``"layer"`` for an op name used in :class:`SiteStats`."""
    if op in _SATURATING_MODULES.values():
        return "saturating"
    if op in _RELU_MODULES.values():
        return "relu"
    return "layer"


def _module_op(module: nn.Module) -> str | None:
    t = type(module)
    return _SATURATING_MODULES.get(t) or _RELU_MODULES.get(t)


@dataclass
class SiteStats:
    """What the probe saw at one site over the sampled forward passes (host numbers).

    Attributes:
        name: the site's key: the module's qualified name, plus ``":op#k"`` for the k-th
            functional activation call inside that module's ``forward``.
        module: qualified name of the module whose forward produced it (``""`` is the root).
        op: ``"sigmoid"``, ``"tanh"``, ``"relu"``, ..., or the layer class (``"Linear"``).
        kind: ``"saturating"``, ``"relu"`` or ``"layer"`` (a parameterised module's output).
        order: position of the site's first call in the forward pass (depth order).
        calls: how many outputs were sampled.
        rms: root mean square of the outputs.
        saturated: share of outputs pinned near a bound (saturating sites; NaN otherwise).
        dead: share of units positive on fewer than ``DEAD_ACTIVE`` of the sampled outputs
            (ReLU-family sites; NaN otherwise).
        units: number of units the dead share is taken over (0 where not measured).
        nonfinite: whether any sampled output was NaN or Inf.
        is_output: whether this site produced the model's output (its saturation is by design).
    """

    name: str
    module: str
    op: str
    kind: str
    order: int
    calls: int = 0
    rms: float = math.nan
    saturated: float = math.nan
    dead: float = math.nan
    units: int = 0
    nonfinite: bool = False
    is_output: bool = False


@dataclass
class TemporalStats:
    """Gradient reaching each time step of a recurrent module's input.

    Attributes:
        module: qualified name of the ``nn.RNN``/``nn.GRU``/``nn.LSTM`` module.
        op: its class name.
        grad_norm: per time step (first to last), the RMS over sampled backward passes of the
            gradient norm at that step's input.
        forget_bias: for an LSTM, the mean forget-gate bias of its first layer
            (``bias_ih + bias_hh``; below about -1 the gate starts mostly closed); NaN otherwise.
    """

    module: str
    op: str
    grad_norm: list[float] = field(default_factory=list)
    forget_bias: float = math.nan


@dataclass
class ParamInfo:
    """A parameter's static facts, for detectors that need more than a gradient norm.

    Attributes:
        name: qualified parameter name (as in ``model.named_parameters()``).
        module: qualified name of the owning module.
        module_type: the owning module's class name.
        shape: the parameter's shape.
        norm: the parameter's L2 norm when the probe summary was taken.
        shared_with: the other modules that hold the same tensor (tied weights, e.g. an
            embedding and the output head); empty when not shared.
    """

    name: str
    module: str
    module_type: str
    shape: list[int]
    norm: float = math.nan
    shared_with: list[str] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ProbeSummary:
    """Host-side result of a :class:`Probe`: sites in forward order, temporal profiles, params.

    Attributes:
        sites: every site seen, sorted by first call (depth order).
        temporal: one entry per recurrent module that received gradient.
        params: static facts of every parameter (module order), with their current norms.
        batches: number of forward passes sampled.
        module_order: qualified names of parameterised modules in the order they first ran.
        loss_recorded: set by the doctor when every step's loss was recorded, so that a loss
            column that is all NaN reads as "the loss was NaN", not as "not recorded".
        initial: the same summary for an earlier window (the first steps), when the caller
            took one; detectors compare the two (e.g. units that died during training).
        forward: False for a summary of the structure alone (:func:`structure_summary`): no
            forward pass was sampled, so no site was seen.
        loss_batch_ratio: the loss of a whole batch over that of its first half, at the starting
            weights (about 2 when the loss is summed over the batch, 1 for a mean); NaN when not
            measured.
    """

    sites: list[SiteStats] = field(default_factory=list)
    temporal: list[TemporalStats] = field(default_factory=list)
    params: list[ParamInfo] = field(default_factory=list)
    batches: int = 0
    module_order: list[str] = field(default_factory=list)
    loss_recorded: bool = False
    initial: ProbeSummary | None = None
    forward: bool = True
    loss_batch_ratio: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, dicts, numbers) for JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeSummary:
        """The inverse of :meth:`to_dict`."""
        return cls(
            sites=[SiteStats(**s) for s in d.get("sites", [])],
            temporal=[TemporalStats(**t) for t in d.get("temporal", [])],
            params=[ParamInfo(**p) for p in d.get("params", [])],
            batches=int(d.get("batches", 0)),
            module_order=list(d.get("module_order", [])),
            loss_recorded=bool(d.get("loss_recorded", False)),
            initial=cls.from_dict(d["initial"]) if d.get("initial") else None,
            forward=bool(d.get("forward", True)),
            loss_batch_ratio=float(d.get("loss_batch_ratio", math.nan)),
        )


def param_infos(model: nn.Module) -> list[ParamInfo]:
    """Static facts of every parameter of ``model``, in module order, with current L2 norms.

    One host sync for all the norms.
    """
    owners: dict[int, tuple[str, str]] = {}
    holders: dict[int, list[str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for _, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), (mname, type(mod).__name__))
            if mname not in holders.setdefault(id(p), []):
                holders[id(p)].append(mname)
    named = list(model.named_parameters())
    if not named:
        return []
    with torch.no_grad():
        norms = torch.stack(
            [torch.linalg.vector_norm(p.detach().float()).to(named[0][1].device) for _, p in named]
        ).tolist()  # [sync] once per summary
    out = []
    for (name, p), n in zip(named, norms):
        mname, mtype = owners.get(id(p), ("", type(model).__name__))
        shared = [h for h in holders.get(id(p), []) if h != mname]
        out.append(ParamInfo(name, mname, mtype, list(p.shape), float(n), shared))
    return out


def structure_summary(model: nn.Module) -> ProbeSummary:
    """What a model's structure alone says (parameter shapes, owning module types, tied weights),
    for detectors reading a recorded run without a forward pass (``Guard.findings()``)."""
    return ProbeSummary(params=param_infos(model), forward=False)


def _forget_bias(model: nn.Module, name: str) -> float:
    """Mean forget-gate bias of an LSTM's first layer (NaN for other modules or no bias)."""
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        return math.nan
    if not isinstance(mod, nn.LSTM) or not mod.bias:
        return math.nan
    h = mod.hidden_size
    with torch.no_grad():
        b = (mod.bias_ih_l0 + mod.bias_hh_l0)[h:2 * h]
        return float(b.float().mean())  # [sync] once per recurrent module per summary


class _Acc:
    """Device accumulators for one site."""

    __slots__ = ("name", "module", "op", "kind", "order", "calls", "sq", "count", "pinned",
                 "bad", "active", "per_unit", "unit_dim", "is_output", "last_out")

    def __init__(self, name: str, module: str, op: str, kind: str, order: int) -> None:
        self.name, self.module, self.op, self.kind, self.order = name, module, op, kind, order
        self.calls = 0
        self.sq: Tensor | None = None  # sum of y^2 (float32+)
        self.count = 0  # elements seen (host int: shapes are known on the host)
        self.pinned: Tensor | None = None  # count of pinned outputs
        self.bad: Tensor | None = None  # any non-finite output
        self.active: Tensor | None = None  # per unit: how many sampled outputs were positive
        self.per_unit = 0  # sampled outputs per unit (host int)
        self.unit_dim: int | None = None
        self.is_output = False
        self.last_out: Tensor | None = None


def _pinned_mask(op: str, y: Tensor) -> Tensor | None:
    """Where the activation's derivative is below ``PINNED_DERIVATIVE`` of its peak."""
    c = PINNED_DERIVATIVE
    if op == "sigmoid":  # σ' = y(1-y) <= 0.25
        return y * (1 - y) < 0.25 * c
    if op == "tanh":  # tanh' = 1 - y^2 <= 1
        return 1 - y * y < c
    if op == "softsign":  # softsign' = (1 - |y|)^2 <= 1
        return (1 - y.abs()) ** 2 < c
    if op == "hardtanh":
        return (y <= -1) | (y >= 1)
    if op == "hardsigmoid":
        return (y <= 0) | (y >= 1)
    return None


class _FunctionalActivations(TorchFunctionMode):
    """Sees activation functions called inside ``forward`` and hands their outputs to the probe."""

    def __init__(self, probe: Probe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        probe = self.probe
        if probe._stack and probe._enabled:
            op = _SATURATING_FUNCS.get(func) or _RELU_FUNCS.get(func)
            if op is not None and isinstance(out, Tensor):
                owner, owner_mod = probe._stack[-1]
                if _module_op(owner_mod) is None:  # an activation module records its own output
                    k = probe._fn_calls.get(owner, 0)
                    probe._fn_calls[owner] = k + 1
                    probe._record(f"{owner}:{op}#{k}" if owner else f":{op}#{k}", owner, op, out)
        return out


class Probe:
    """Forward hooks (and a function mode) that sample per-layer activation statistics.

    Args:
        model (nn.Module): the model to watch. Its parameters and outputs are not changed.
        functional (bool, optional): also see activation functions called inside ``forward``
            (through a ``TorchFunctionMode``). Default: True.
        temporal (bool, optional): measure the gradient reaching each time step of recurrent
            modules' inputs (needs a backward pass). Default: True.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from gradguard.doctor.probes import Probe
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> with Probe(net) as probe:
        ...     _ = net(torch.randn(16, 4))
        >>> [s.op for s in probe.summary().sites]
        ['Linear', 'tanh', 'Linear']
    """

    def __init__(self, model: nn.Module, *, functional: bool = True, temporal: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        self.model = model
        self.functional = functional
        self.temporal = temporal
        self._handles: list[Any] = []
        self._mode: _FunctionalActivations | None = None
        self._stack: list[tuple[str, nn.Module]] = []
        self._fn_calls: dict[str, int] = {}
        self._sites: dict[str, _Acc] = {}
        self._order = 0
        self._module_order: list[str] = []
        self._temporal: dict[str, tuple[str, Tensor | None, int]] = {}
        self._batches = 0
        self._enabled = True
        self._last_leaf: nn.Module | None = None
        self._depth = 0  # nesting of the root module's forward

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Probe:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def attach(self) -> None:
        """Register the hooks (``with Probe(model):`` does this for you)."""
        if self._handles:
            return
        for name, mod in self.model.named_modules():
            self._handles.append(mod.register_forward_pre_hook(self._pre_hook(name, mod)))
            self._handles.append(
                mod.register_forward_hook(self._post_hook(name, mod), always_call=True)
            )

    def detach(self) -> None:
        """Remove every hook and the function mode."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._mode is not None:  # only if a forward pass was interrupted without its hooks
            self._mode.__exit__(None, None, None)
            self._mode = None
        self._stack = []
        self._depth = 0

    @property
    def enabled(self) -> bool:
        """Whether forward passes are sampled (hooks stay registered either way)."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)

    def reset(self) -> None:
        """Forget everything sampled so far (start a new window); the site order is kept."""
        for acc in self._sites.values():
            acc.calls, acc.count = 0, 0
            acc.sq = acc.pinned = acc.bad = acc.active = None
            acc.per_unit = 0
            acc.is_output = False
        self._temporal = {k: (op, None, 0) for k, (op, _, _) in self._temporal.items()}
        self._batches = 0

    # -- hooks -------------------------------------------------------------------------------
    def _pre_hook(self, name: str, mod: nn.Module) -> Callable[..., Any]:
        is_rnn = isinstance(mod, nn.RNNBase)

        def hook(module: nn.Module, args: tuple[Any, ...]) -> Any:
            if module is self.model:
                if self._depth == 0:
                    self._fn_calls = {}
                    if self._enabled:
                        self._batches += 1
                    # The function mode is active only inside the model's forward: the backward
                    # pass, the loss and the optimizer run without it.
                    if self.functional and self._enabled:
                        self._mode = _FunctionalActivations(self)
                        self._mode.__enter__()
                self._depth += 1
            self._stack.append((name, module))
            if is_rnn and self.temporal and self._enabled and torch.is_grad_enabled() and args:
                return self._watch_time(name, module, args)
            return None

        return hook

    def _post_hook(self, name: str, mod: nn.Module) -> Callable[..., Any]:
        op = _module_op(mod)
        has_params = any(True for _ in mod.parameters(recurse=False))

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self._stack and self._stack[-1][1] is module:
                self._stack.pop()
            if module is self.model:
                self._depth = max(0, self._depth - 1)
                if self._depth == 0 and self._mode is not None:
                    self._mode.__exit__(None, None, None)
                    self._mode = None
            if not self._enabled:
                return
            y = output[0] if isinstance(output, (tuple, list)) and output else output
            if op is not None and isinstance(y, Tensor):
                self._record(name, name, op, y)
            elif has_params and isinstance(y, Tensor) and y.is_floating_point():
                if name not in self._module_order:
                    self._module_order.append(name)
                self._record(name, name, type(module).__name__, y)
            if has_params or op is not None:
                self._last_leaf = module
            if module is self.model:
                self._mark_output(output)

        return hook

    def _mark_output(self, output: Any) -> None:
        outs = output if isinstance(output, (tuple, list)) else (output,)
        for acc in self._sites.values():
            if acc.last_out is not None and any(o is acc.last_out for o in outs):
                acc.is_output = True
            acc.last_out = None

    # -- recording (device only) -------------------------------------------------------------
    def _site(self, key: str, module: str, op: str) -> _Acc:
        acc = self._sites.get(key)
        if acc is None:
            acc = _Acc(key, module, op, activation_kind(op), self._order)
            self._order += 1
            self._sites[key] = acc
        return acc

    @torch.no_grad()
    def _record(self, key: str, module: str, op: str, y: Tensor) -> None:
        if not y.is_floating_point() or y.numel() == 0:
            return
        acc = self._site(key, module, op)
        yd = y.detach()
        acc_dtype = torch.float64 if yd.dtype == torch.float64 else torch.float32
        yf = yd.to(acc_dtype)
        sq = torch.sum(yf * yf)
        acc.sq = sq if acc.sq is None else acc.sq + sq
        bad = ~torch.isfinite(sq)
        acc.bad = bad if acc.bad is None else acc.bad | bad
        acc.count += yd.numel()
        acc.calls += 1
        acc.last_out = y
        if acc.kind == "saturating":
            m = _pinned_mask(op, yf)
            if m is not None:
                n = m.sum()
                acc.pinned = n if acc.pinned is None else acc.pinned + n
        elif acc.kind == "relu" and yd.ndim >= 1:
            dim = self._unit_dim(yd)
            pos = yd > 0
            other = [d for d in range(yd.ndim) if d != dim]
            active = pos.sum(dim=other, dtype=torch.float32) if other else pos.float()
            if acc.active is not None and acc.active.shape != active.shape:
                acc.active, acc.per_unit = None, 0  # the unit count changed: restart
            acc.active = active if acc.active is None else acc.active + active
            acc.per_unit += yd.numel() // max(1, yd.shape[dim])
            acc.unit_dim = dim

    def _unit_dim(self, y: Tensor) -> int:
        """Units are channels after a convolution (dim 1), features otherwise (last dim)."""
        if y.ndim <= 1:
            return 0
        if y.ndim >= 4:
            return 1
        if y.ndim == 3 and isinstance(self._last_leaf, nn.Conv1d):
            return 1
        return y.ndim - 1

    def _watch_time(self, name: str, module: nn.Module, args: tuple[Any, ...]) -> Any:
        x = args[0]
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim not in (2, 3):
            return None  # PackedSequence and friends: not measured
        new_args = args
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
            new_args = (x, *args[1:])
        batch_first = bool(getattr(module, "batch_first", False))
        tdim = 1 if (x.ndim == 3 and batch_first) else 0
        op = type(module).__name__

        def grad_hook(g: Tensor) -> None:
            with torch.no_grad():
                gf = g.detach().float()
                other = [d for d in range(gf.ndim) if d != tdim]
                per_t = (gf * gf).sum(dim=other)
                prev_op, buf, n = self._temporal.get(name, (op, None, 0))
                if buf is not None and buf.shape != per_t.shape:
                    buf, n = None, 0  # a different sequence length: keep the latest only
                self._temporal[name] = (op, per_t if buf is None else buf + per_t, n + 1)

        x.register_hook(grad_hook)
        return new_args

    # -- read back -----------------------------------------------------------------------------
    def summary(self) -> ProbeSummary:
        """Everything sampled since the last :meth:`reset`, as host numbers (one host sync)."""
        accs = sorted(self._sites.values(), key=lambda a: a.order)
        flat: list[Tensor] = []
        layout: list[tuple[str, int]] = []
        device = None
        for a in accs:
            for attr in ("sq", "pinned", "bad"):
                t = getattr(a, attr)
                if t is not None:
                    device = device or t.device
                    flat.append(t.reshape(1).to(torch.float64))
                    layout.append((attr, 1))
            if a.active is not None:
                device = device or a.active.device
                flat.append(a.active.reshape(-1).to(torch.float64))
                layout.append(("active", a.active.numel()))
        temporal_items = [(k, op, b, n) for k, (op, b, n) in self._temporal.items() if b is not None]
        for _, _, b, _ in temporal_items:
            device = device or b.device
            flat.append(b.reshape(-1).to(torch.float64))
        values: list[float] = []
        if flat:
            values = torch.cat([t.to(device) for t in flat]).tolist()  # [sync] one per summary
        pos = 0
        sites = []
        for a in accs:
            got: dict[str, Any] = {}
            for attr in ("sq", "pinned", "bad"):
                if getattr(a, attr) is not None:
                    got[attr] = values[pos]
                    pos += 1
            if a.active is not None:
                n = a.active.numel()
                got["active"] = values[pos:pos + n]
                pos += n
            s = SiteStats(a.name, a.module, a.op, a.kind, a.order, calls=a.calls,
                          is_output=a.is_output)
            if a.count and "sq" in got:
                s.rms = math.sqrt(got["sq"] / a.count) if math.isfinite(got["sq"]) else math.inf
                s.nonfinite = bool(got.get("bad", 0.0))
            if "pinned" in got and a.count:
                s.saturated = got["pinned"] / a.count
            if "active" in got and got["active"] and a.per_unit:
                s.units = len(got["active"])
                s.dead = sum(1 for v in got["active"] if v < DEAD_ACTIVE * a.per_unit) / s.units
            sites.append(s)
        temporal = []
        for name, op, b, n in temporal_items:
            k = b.numel()
            vals = values[pos:pos + k]
            pos += k
            temporal.append(TemporalStats(name, op, [math.sqrt(v / n) for v in vals],
                                          _forget_bias(self.model, name)))
        return ProbeSummary(sites=sites, temporal=temporal, params=param_infos(self.model),
                            batches=self._batches, module_order=list(self._module_order))
