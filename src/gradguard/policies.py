"""Clipping policies: threshold rules with explicit, checkpointable device state.

A policy is a rule plus a typed state record, in the manner of optax's transforms. The
:class:`gradguard.Guard` drives it once per optimizer step through this protocol:

* ``bind(model, plan)`` once, when the Guard is created: learn the parameters (and, for AGC, find
  the output head) and put the state on the gradients' device;
* ``measure(params, grads, foreach) -> GradStats | None`` every step, in one process: a policy
  whose own pass over the gradients yields the statistics (AGC's unit norms) returns them, so the
  Guard skips its pass; None (the base class) lets the Guard measure;
* ``clip_(params, grads, stats, skip) -> (threshold, clipped)`` every step: clip ``grads`` in
  place and return two 0-dim device tensors. ``stats`` is the one pass over the gradients
  (:class:`gradguard.GradStats`), ``skip`` a 0-dim bool tensor that is True when the Guard will
  not apply this step.

Two rules hold for every policy, and are what sets them apart from the reference packages:

* **A non-finite norm never enters a policy's statistics** and a skipped step never updates its
  state. ZClip's and AutoClip's reference packages are poisoned for good by one NaN step
  (``specs/remedies.md`` section 2); here the state is updated through ``torch.where``, so a bad
  step leaves it bit-identical.
* **No host sync.** Every decision is a tensor (``torch.where``, ``index_select``, ``sort``); no
  Python ``if`` reads a device value. On a skipped step the gradients are left untouched
  (coefficient 1) for the skip logic.

Statistics (EMA mean and variance, the AutoClip history) are kept in float64 whatever the model's
dtype: they are a handful of scalars, and float64 keeps them within 1e-12 of the Python-float
reference implementations.
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from gradguard._checks import (
    check_choice,
    check_int,
    check_norm_type,
    check_positive,
    check_probability,
    check_state_config,
    check_state_tensors,
)
from gradguard._ema import running_update
from gradguard._plan import ParamPlan, display_name
from gradguard.clip import AGCBuffers, AGCUnits, _check_eps, clip_coef, scale_
from gradguard.stats import GradStats, _norm_out_dtype, _widen, use_foreach

log = logging.getLogger(__name__)

__all__ = ["AGC", "AutoClip", "ClipPolicy", "FixedClip", "ValueClip", "ZClip"]



def _stat_dtype(device: torch.device) -> torch.dtype:
    """float64 for policy statistics, except where the device has none (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _present(grads: Sequence[Tensor | None]) -> list[Tensor]:
    return [g for g in grads if g is not None]


class ClipPolicy:
    """Base class and protocol of every clipping policy.

    Subclasses implement :meth:`clip_` and keep their state as a NamedTuple of device tensors in
    ``self.state``; :meth:`state_dict` and :meth:`load_state_dict` round-trip it.

    Attributes:
        norm_type: the order of the norm the Guard computes its statistics with (2.0 unless the
            policy says otherwise, e.g. ``FixedClip(norm_type=1.0)``).
    """

    norm_type: float = 2.0
    state: Any = None

    def __init__(self) -> None:
        self._plan: ParamPlan | None = None

    # -- protocol ---------------------------------------------------------------------------------
    def bind(self, model: nn.Module, plan: ParamPlan) -> None:
        """Attach to ``model`` (called once by the Guard) and move the state to its device."""
        if self._plan is not None and [id(p) for p in self._plan.params] != [id(p) for p in plan.params]:
            raise ValueError(
                f"this {type(self).__name__} is already bound to another model; a policy keeps "
                "per-run state, so create one policy per Guard."
            )
        self._plan = plan
        self._init_state(plan.device)

    def _init_state(self, device: torch.device) -> None:
        """Create ``self.state`` on ``device``; stateless policies keep None."""

    def measure(self, params: Sequence[Tensor], grads: Sequence[Tensor | None],
                foreach: bool | None = None) -> GradStats | None:
        """Optionally compute this step's L2 :class:`GradStats` as a by-product of the policy's
        own pass over the gradients (AGC's unit norms); None (the default) lets the Guard run
        its own pass. Called before :meth:`clip_`, in one process only."""
        return None

    def clip_(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor | None],
        stats: GradStats,
        skip: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Clip ``grads`` in place; return ``(threshold, clipped)`` as 0-dim device tensors.

        Args:
            params: the parameters, aligned with ``grads`` (module order).
            grads: their gradients (None where absent).
            stats: the statistics of this step's gradients (``compute_stats`` over ``grads``).
            skip: 0-dim bool tensor; True means the step will not be applied: leave the
                gradients untouched and the state unchanged.

        Returns:
            threshold: the norm the gradients were clipped to, or the norm above which they
                would have been (``+inf`` when the policy has no norm threshold this step).
            clipped: True when this step's gradients were scaled down.
        """
        raise NotImplementedError

    # -- state ------------------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The policy's configuration and state (tensors cloned), for ``torch.save``."""
        state = None
        if self.state is not None:
            state = {k: v.detach().clone() for k, v in self.state._asdict().items()}
        return {"policy": type(self).__name__, "config": self._config(), "state": state}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restore what :meth:`state_dict` returned (onto this policy's device).

        Args:
            state_dict: from :meth:`state_dict` (e.g. ``torch.load(..., weights_only=True)``).
            strict: the checkpoint's settings must equal this policy's (a ``ValueError`` names
                each difference). ``False`` loads the state anyway with a warning; shapes are
                checked either way.
        """
        kind = state_dict.get("policy")
        if kind != type(self).__name__:
            raise ValueError(
                f"the checkpoint holds the state of a {kind} policy, not of a "
                f"{type(self).__name__}; construct the Guard with the same `clip` policy it was "
                "saved with."
            )
        check_state_config(type(self).__name__, state_dict.get("config", {}), self._config(),
                           strict=strict)
        saved = state_dict.get("state")
        if self.state is None or saved is None:
            return
        cur = self.state._asdict()
        check_state_tensors(kind, saved, cur)
        self.state = type(self.state)(
            **{f: saved[f].to(device=cur[f].device, dtype=cur[f].dtype).clone() for f in cur}
        )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({args})"


# ---------------------------------------------------------------------------------------------
class FixedClip(ClipPolicy):
    r"""Clip the global norm to a fixed ``max_norm`` (``torch.nn.utils.clip_grad_norm_``).

    .. math::
        g \leftarrow g \cdot \min\left(1, \frac{\text{max\_norm}}{\lVert g \rVert_p + \epsilon}\right)

    When to use: the default for most training (HF Trainer, Megatron and DeepSpeed use 1.0). It
    matches torch bit for bit for float32/float64 gradients (``eps=1e-6``); ``eps=0`` gives the
    optax/TensorFlow convention (untouched below ``max_norm``, exactly ``max_norm`` above).

    Args:
        max_norm: the largest allowed norm, > 0.
        norm_type: the order p of the norm, > 0 or ``'inf'``. Default: 2.0.
        eps: 1e-6 (torch, default) or 0 (optax/TensorFlow).

    Example:
        >>> import gradguard as gg
        >>> gg.FixedClip(1.0)
        FixedClip(max_norm=1.0, norm_type=2.0, eps=1e-06)

    References:
        Pascanu, Mikolov, Bengio, "On the difficulty of training recurrent neural networks",
        ICML 2013 (arXiv:1211.5063).
    """

    def __init__(self, max_norm: float, norm_type: float | str = 2.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.max_norm = check_positive(
            "max_norm", max_norm, "Pass the largest allowed gradient norm, e.g. FixedClip(1.0)."
        )
        self.norm_type = check_norm_type(norm_type)
        self.eps = _check_eps(eps)
        self._thr: Tensor | None = None
        self._one: Tensor | None = None

    def _config(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm, "norm_type": self.norm_type, "eps": self.eps}

    def clip_(self, params: Sequence[Tensor], grads: Sequence[Tensor | None], stats: GradStats,
              skip: Tensor) -> tuple[Tensor, Tensor]:
        total = stats.global_norm
        if self._thr is None or self._thr.device != total.device or self._thr.dtype != total.dtype:
            self._thr = torch.full((), self.max_norm, dtype=total.dtype, device=total.device)
            self._one = torch.ones((), dtype=total.dtype, device=total.device)
        coef = clip_coef(total, self._thr, self.eps)
        coef = torch.where(skip | stats.nonfinite, self._one, coef)
        scale_(_present(grads), coef)
        return self._thr, coef < 1


# ---------------------------------------------------------------------------------------------
class ValueClip(ClipPolicy):
    """Clamp every gradient element to ``[-clip_value, clip_value]`` (``clip_grad_value_``).

    When to use: rarely; it changes the gradient's direction. It runs after the non-finite check
    (clamping would turn an Inf into ``clip_value`` and hide an overflow), and leaves a skipped
    step's gradients untouched. ``clipped`` is exact (one extra max-abs pass); ``threshold`` is
    ``+inf`` because no norm is clipped.

    Args:
        clip_value: the largest allowed absolute gradient value, > 0.

    Example:
        >>> import gradguard as gg
        >>> gg.ValueClip(0.5)
        ValueClip(clip_value=0.5)
    """

    def __init__(self, clip_value: float) -> None:
        super().__init__()
        self.clip_value = check_positive(
            "clip_value", clip_value, "Pass the largest allowed absolute gradient value, e.g. ValueClip(1.0)."
        )

    def _config(self) -> dict[str, Any]:
        return {"clip_value": self.clip_value}

    def clip_(self, params: Sequence[Tensor], grads: Sequence[Tensor | None], stats: GradStats,
              skip: Tensor) -> tuple[Tensor, Tensor]:
        gs = _present(grads)
        total = stats.global_norm
        inf = torch.full((), math.inf, dtype=total.dtype, device=total.device)
        if not gs:
            return inf, torch.zeros((), dtype=torch.bool, device=total.device)
        maxabs = []
        by_dev: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for g in gs:
            by_dev.setdefault((g.device, g.dtype), []).append(g)
        for (dev, dt), group in by_dev.items():
            maxabs.append(torch.stack(torch._foreach_norm(group, math.inf)).max().to(total.device, total.dtype))
            v = torch.full((), self.clip_value, dtype=dt, device=dev)
            s = skip.to(dev)
            hi = torch.where(s, torch.full_like(v, math.inf), v)
            # A list of 0-dim tensors keeps the bound on the device (a tensor passed as a Scalar
            # would be read back: a host sync).
            torch._foreach_minimum_(group, [hi] * len(group))
            torch._foreach_maximum_(group, [-hi] * len(group))
        clipped = (torch.stack(maxabs).max() > self.clip_value) & ~skip
        return inf, clipped


# ---------------------------------------------------------------------------------------------
def _tensors_in(obj: Any, depth: int = 0) -> list[Tensor]:
    """Tensors inside a (nested) model output: a tensor, tuple, list or mapping."""
    if isinstance(obj, Tensor):
        return [obj]
    if depth > 4:
        return []
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors_in(o, depth + 1)]
    if isinstance(obj, dict) or hasattr(obj, "values") and callable(obj.values):
        try:
            return [t for o in obj.values() for t in _tensors_in(o, depth + 1)]
        except Exception:  # an exotic mapping: give up on it, the fallback still applies
            return []
    return []


class _AGCLayout:
    """Which planned tensors are clipped as matrices and which as one unit, for one set of
    present gradients, when they share one (device, dtype) and the foreach kernels; with the
    buffers their unit norms and factors are written into every step (float32/float64)."""

    def __init__(self, plan: ParamPlan, mats: list[int], vecs: list[int], rest: list[int]) -> None:
        params = plan.params
        self.mats, self.vecs, self.rest = mats, vecs, rest
        self.rows = [params[i].shape[0] for i in mats]
        self.n_rows = sum(self.rows)
        dev = plan.device
        self.lengths = torch.tensor(self.rows, dtype=torch.long, device=dev)  # segment sums
        order = mats + vecs + rest
        self.order = None if order == list(range(len(params))) else torch.tensor(order, dtype=torch.long, device=dev)
        dtype = params[mats[0] if mats else vecs[0]].dtype if (mats or vecs) else None
        self.buf = None
        if dtype in (torch.float32, torch.float64):
            self.buf = AGCBuffers(self.rows, [params[i].ndim for i in mats], len(vecs), dtype, dev)

    @classmethod
    def build(cls, plan: ParamPlan, absent: tuple[bool, ...], excluded: set[int]) -> _AGCLayout | None:
        params = plan.params
        if len(plan.groups) != 1 or not use_foreach(list(params), plan.device, None):
            return None
        present = [i for i, a in enumerate(absent) if not a]
        if not present:
            return None
        mats = [i for i in present if i not in excluded and params[i].ndim >= 2 and params[i].numel() > 0]
        mat_set = set(mats)
        vecs = [i for i in present if i not in excluded and i not in mat_set]
        return cls(plan, mats, vecs, [i for i in present if i in excluded])

    def units(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> AGCUnits:
        # The weights are read under no_grad (see AGC.measure/clip_), so no detach() per tensor.
        return AGCUnits([grads[i] for i in self.mats], [params[i] for i in self.mats],  # type: ignore[misc]
                        [grads[i] for i in self.vecs], [params[i] for i in self.vecs],  # type: ignore[misc]
                        self.rows)


# Autograd nodes between a head's matrix product and the model's output, and between the
# product and the head's parameters (reshapes, casts, scaling, soft-capping, (log-)softmax).
_PASS_THROUGH = frozenset({
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "TBackward0",
    "TransposeBackward0", "TransposeBackward1", "PermuteBackward0", "ExpandBackward0",
    "CloneBackward0", "ToCopyBackward0", "SqueezeBackward0", "SqueezeBackward1",
    "SqueezeBackward4", "UnsqueezeBackward0", "SliceBackward0", "SelectBackward0",
    "AliasBackward0", "LogSoftmaxBackward0", "SoftmaxBackward0", "DivBackward0",
    "DivBackward1", "MulBackward0", "MulBackward1", "AddBackward0", "AddBackward1",
    "SubBackward0", "TanhBackward0", "NegBackward0",
})
_PRODUCTS = frozenset({
    "MmBackward0", "AddmmBackward0", "BmmBackward0", "MvBackward0", "LinearBackward0",
    "BaddbmmBackward0", "AddmvBackward0", "MatmulBackward0",
})
_TO_PARAM = frozenset({"TBackward0", "TransposeBackward0", "TransposeBackward1", "PermuteBackward0",
                       "ViewBackward0", "ReshapeAliasBackward0", "ExpandBackward0", "ToCopyBackward0",
                       "UnsafeViewBackward0", "AliasBackward0", "CloneBackward0"})


def _leaf_params(node: Any, allowed: frozenset[str], depth: int = 0) -> list[Tensor]:
    """The leaf tensors (parameters) ``node`` reads through ``allowed`` nodes only."""
    if node is None or depth > 8:
        return []
    name = type(node).__name__
    if name == "AccumulateGrad":
        return [node.variable]
    if name not in allowed:
        return []
    return [p for nxt, _ in node.next_functions for p in _leaf_params(nxt, allowed, depth + 1)]


def _head_from_graph(outputs: Sequence[Tensor]) -> list[Tensor]:
    """The parameters read by the matrix product that produced the model's output (its head).

    Logits first (outputs with dims), then scalars (a loss computed inside ``forward``).
    Walks back through :data:`_PASS_THROUGH` nodes; at an add, a parameter on the other side
    (a bias) belongs to the head. Empty when no graph leads to a product within a few nodes.
    """
    for t in sorted((t for t in outputs if t.grad_fn is not None), key=lambda t: t.ndim == 0):
        extra: list[Tensor] = []
        frontier, seen = [t.grad_fn], 0
        while frontier and seen < 64:
            node = frontier.pop(0)
            seen += 1
            name = type(node).__name__
            if name in _PRODUCTS:
                found = [p for nxt, _ in node.next_functions for p in _leaf_params(nxt, _TO_PARAM)]
                if found:
                    return found + extra
                continue
            if name not in _PASS_THROUGH and not name.startswith(("NllLoss", "CrossEntropy")):
                continue
            for nxt, _ in node.next_functions:
                if nxt is None:
                    continue
                if type(nxt).__name__ == "AccumulateGrad":
                    extra.append(nxt.variable)  # a bias or a learned scale added to the logits
                else:
                    frontier.append(nxt)
    return []


class AGC(ClipPolicy):
    r"""Adaptive gradient clipping, unit-wise (Brock et al. 2021), with the output head excluded.

    For every output unit ``u`` (a row of a Linear/Conv/Embedding weight in torch's (out, in, ...)
    layout; the whole tensor for biases and norm gains):

    .. math::
        m_u = \lambda \max(\lVert W_u \rVert_2, \epsilon),\qquad
        G_u \leftarrow G_u \cdot \frac{m_u}{\max(\lVert G_u \rVert_2, 10^{-6})}
        \ \text{ if } \lVert G_u \rVert_2 \ge m_u

    It matches timm's ``adaptive_clip_grad`` (optax keeps at strict ``<``; they differ only at
    equality). **The head is found from the model's output**, not, as in timm, by dropping "the
    last two parameters": with ``exclude="auto"`` the policy watches the first forward pass after
    it is bound and follows the output's autograd graph back through reshapes, scaling, bias
    additions and (log-)softmax to the matrix product that made it; the parameters that product
    reads (through transposes and casts) are the head. So a tied head, ``x @ wte.weight.t()`` or
    ``F.linear(x, wte.weight)``, excludes the embedding matrix it shares, and an ``nn.Linear``
    head its weight and bias. Without a graph (a forward under ``no_grad``), the last
    ``nn.Linear`` whose output *is* the model's output (same storage) is taken, else the last
    Linear called; if no forward pass was seen before the first step, the last ``nn.Linear`` in
    module order (a documented fallback, logged at INFO).

    Per step it costs one dim-reduction per matrix for each of W and G (torch has no per-row
    foreach norm), one ``_foreach_norm`` for all biases and gains, and a handful of ops for
    every unit's factor at once, applied with ``_foreach_mul_``. In one process, with one
    (device, dtype), the gradient unit norms also give the Guard its statistics, so the Guard
    makes no separate pass over the gradients.

    When to use: normalizer-free ConvNets (NFNets) at large batch sizes, with SGD. Field reports
    show λ = 0.01 hurting Adam/Lion transformers (remedies.md section 1.4); tune λ there.

    Args:
        clipping: λ, the largest allowed ratio of unit gradient norm to unit weight norm.
            Default: 0.01.
        eps: floor of the weight norm, so zero-initialised units can move. Default: 1e-3.
        exclude: ``"auto"`` (find the head), or module/parameter names to leave unclipped
            (``["fc"]``, ``["fc.weight", "fc.bias"]``), or ``()`` to clip everything.

    Example:
        >>> import torch, gradguard as gg
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> guard = gg.Guard(model, clip=gg.AGC(0.01))
        >>> _ = model(torch.randn(3, 4)).sum().backward()   # the first forward reveals the head
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> _ = guard.step(opt)
        >>> guard.clip.excluded
        ['2.weight', '2.bias']

    References:
        Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image Recognition Without
        Normalization", ICML 2021 (arXiv:2102.06171).
    """

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3,
                 exclude: str | Iterable[str] = "auto") -> None:
        super().__init__()
        self.clipping = check_positive("clipping", clipping, "AGC's lambda is typically 0.01 to 0.16.")
        self.eps = check_positive("eps", eps, "AGC's weight-norm floor is typically 1e-3.")
        if isinstance(exclude, str):
            if exclude != "auto":
                raise ValueError(
                    f"`exclude` must be 'auto' or a list of module/parameter names, got {exclude!r}. "
                    f"To exclude one module pass a list: exclude=[{exclude!r}]."
                )
            self._exclude_spec: str | tuple[str, ...] = "auto"
        else:
            try:
                names = tuple(exclude)
            except TypeError:
                raise TypeError(
                    f"`exclude` must be 'auto' or an iterable of names, got {type(exclude).__name__}."
                ) from None
            bad = [n for n in names if not isinstance(n, str)]
            if bad:
                raise TypeError(
                    f"`exclude` entries must be module or parameter names (str), got {bad[0]!r}."
                )
            self._exclude_spec = names
        self._excluded: set[int] | None = None  # indices into the plan
        self._layouts: dict[tuple[bool, ...], _AGCLayout | None] = {}
        self._pending: tuple[GradStats, AGCUnits, Tensor, Tensor, AGCBuffers | None] | None = None
        self._inf: Tensor | None = None
        self._hooks: list[Any] = []
        self._trace: list[tuple[str, int, int]] = []
        self._model: nn.Module | None = None

    def _config(self) -> dict[str, Any]:
        return {"clipping": self.clipping, "eps": self.eps, "exclude": self._exclude_spec}

    @property
    def excluded(self) -> list[str]:
        """Names of the parameters left unclipped (resolved at the first step for ``"auto"``)."""
        if self._plan is None or self._excluded is None:
            return []
        return [self._plan.names[i] for i in sorted(self._excluded)]

    def bind(self, model: nn.Module, plan: ParamPlan) -> None:
        super().bind(model, plan)
        self._model = model
        if self._exclude_spec == "auto":
            self._install_trace(model)
        else:
            self._set_excluded(self._resolve_names(model, plan, self._exclude_spec), "as named")

    # -- head discovery -----------------------------------------------------------------------
    def _install_trace(self, model: nn.Module) -> None:
        self._trace = []
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear):
                self._hooks.append(mod.register_forward_hook(self._linear_hook(name)))
        if self._hooks:
            self._hooks.append(model.register_forward_hook(self._root_hook))

    def _linear_hook(self, name: str):  # type: ignore[no-untyped-def]
        def hook(mod: nn.Module, inp: Any, out: Any) -> None:
            if isinstance(out, Tensor):
                self._trace.append((name, out.untyped_storage().data_ptr(), out.numel()))
        return hook

    def _root_hook(self, mod: nn.Module, inp: Any, out: Any) -> None:
        found = _head_from_graph(_tensors_in(out))
        if found:
            _, plan = self._bound()
            ids = {id(p) for p in found}
            self._remove_hooks()
            self._set_excluded({i for i, p in enumerate(plan.params) if id(p) in ids},
                               "the matrix product that makes the model's output")
            return
        outs = {(t.untyped_storage().data_ptr(), t.numel()) for t in _tensors_in(out)}
        head = None
        for name, ptr, numel in reversed(self._trace):
            if (ptr, numel) in outs:
                head, how = name, "its output is the model's output"
                break
        if head is None and self._trace:
            head, how = self._trace[-1][0], "the last Linear called in the forward pass"
        self._remove_hooks()
        if head is not None:
            self._set_head(head, how)

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._trace = []

    def _bound(self) -> tuple[nn.Module, ParamPlan]:
        """The model and plan from :meth:`bind`; a clear error where the policy was never bound."""
        if self._model is None or self._plan is None:
            raise RuntimeError(
                "AGC is not bound to a model: use it through a Guard, "
                "gg.Guard(model, clip=gg.AGC(...)), or call bind(model, plan) before clip_()."
            )
        return self._model, self._plan

    def _set_head(self, module_name: str, how: str) -> None:
        model, plan = self._bound()
        head = model.get_submodule(module_name)
        ids = {id(p) for p in head.parameters()}
        self._set_excluded({i for i, p in enumerate(plan.params) if id(p) in ids},
                           f"module {display_name(module_name)!r}: {how}")

    def _set_excluded(self, excluded: set[int], how: str) -> None:
        self._excluded = excluded
        self._layouts = {}
        log.info("AGC: excluding the head (%s): %s", how, self.excluded)

    def _fallback_head(self) -> None:
        model, _ = self._bound()
        self._remove_hooks()
        last = None
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear):
                last = name
        if last is None:
            self._set_excluded(set(), "none: the model has no nn.Linear")
        else:
            self._set_head(last, "no forward pass was traced; the last nn.Linear in module order")

    @staticmethod
    def _resolve_names(model: nn.Module, plan: ParamPlan, names: Sequence[str]) -> set[int]:
        modules = {display_name(k): m for k, m in model.named_modules()}
        out: set[int] = set()
        for n in names:
            if n in plan.names:
                out.add(plan.names.index(n))
            elif n in modules and n != "":
                ids = {id(p) for p in modules[n].parameters()}
                out.update(i for i, p in enumerate(plan.params) if id(p) in ids)
            else:
                raise ValueError(
                    f"`exclude` names {n!r}, which is neither a module nor a trainable parameter "
                    f"of the model; parameters include {list(plan.names[:6])}."
                )
        return out

    # -- the per-step path ----------------------------------------------------------------------
    def _layout(self, grads: Sequence[Tensor | None]) -> _AGCLayout | None:
        """The split of this step's gradients into units (cached per set of present gradients),
        or None where the batched single-group path does not apply."""
        key = tuple(map(operator.is_, grads, itertools.repeat(None)))
        if key not in self._layouts:
            _, plan = self._bound()
            self._layouts[key] = _AGCLayout.build(plan, key, self._excluded or set())
        return self._layouts[key]

    @torch.no_grad()
    def measure(self, params: Sequence[Tensor], grads: Sequence[Tensor | None],
                foreach: bool | None = None) -> GradStats | None:
        if self._excluded is None:
            self._fallback_head()
        lay = self._layout(grads)
        if lay is None or foreach is False:
            return None
        units = lay.units(params, grads)
        clipped_any = bool(lay.mats or lay.vecs)
        if clipped_any:
            w_u, g_u = units.norms(True, lay.buf)
        # The per-tensor norms come from the unit norms: one pass over the gradients serves both.
        parts = []
        if lay.rows:
            # unsafe=True: the lengths are right by construction, and checking them reads them
            # back with .item() inside the op (a sync on a GPU that no dispatch mode can see)
            parts.append(torch.segment_reduce(g_u[:lay.n_rows].square(), "sum", lengths=lay.lengths,
                                              unsafe=True).sqrt())
        if units.vecs:
            parts.append(g_u[lay.n_rows:])
        if lay.rest:
            rest = [grads[i] for i in lay.rest]
            parts.append(_widen(torch.stack(torch._foreach_norm(rest, 2, dtype=_norm_out_dtype(
                rest[0].device, rest[0].dtype)))))
        flat = parts[0] if len(parts) == 1 else torch.cat(parts)
        if lay.order is None:
            per = flat
        else:
            per = torch.zeros(len(grads), dtype=flat.dtype, device=flat.device).index_copy_(0, lay.order, flat)
        total = torch.linalg.vector_norm(per, 2)
        stats = GradStats(total, per, total.sub(total).ne(0), 2.0)
        self._pending = (stats, units, w_u, g_u, lay.buf) if clipped_any else None
        return stats

    @torch.no_grad()
    def clip_(self, params: Sequence[Tensor], grads: Sequence[Tensor | None], stats: GradStats,
              skip: Tensor) -> tuple[Tensor, Tensor]:
        if self._excluded is None:
            self._fallback_head()
        total = stats.global_norm
        if self._inf is None or self._inf.device != total.device or self._inf.dtype != total.dtype:
            self._inf = torch.full((), math.inf, dtype=total.dtype, device=total.device)
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] is stats:
            batches = [(pending[1], pending[2], pending[3], True, pending[4])]
        else:
            batches = []
            for units, foreach, buf in self._groups(params, grads):
                if units.mats or units.vecs:  # not everything is the (excluded) head
                    batches.append((units, *units.norms(foreach, buf), foreach, buf))
        hits = []
        for units, w_u, g_u, foreach, buf in batches:
            mn = w_u.clamp_min(self.eps).mul_(self.clipping)
            s = skip.to(g_u.device)
            # timm's factor where the unit is clipped; 1 where it is kept or the step is skipped
            clip = mn / g_u.clamp_min(1e-6)
            if buf is None:
                factor = torch.where((g_u < mn) | s, 1.0, clip)
            else:
                factor = torch.where((g_u < mn) | s, buf.one, clip, out=buf.factor)
            units.scale_(factor, foreach, buf)
            hits.append(((g_u >= mn).any() & ~s).to(total.device))
        if not hits:
            return self._inf, torch.zeros((), dtype=torch.bool, device=total.device)
        return self._inf, hits[0] if len(hits) == 1 else torch.stack(hits).any()

    def _groups(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]
                ) -> list[tuple[AGCUnits, bool, AGCBuffers | None]]:
        """The clipped (gradient, weight) pairs as units, per (device, dtype)."""
        lay = self._layout(grads)
        if lay is not None:
            return [(lay.units(params, grads), True, lay.buf)]
        excluded = self._excluded or set()
        by: dict[tuple[torch.device, torch.dtype, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is not None and i not in excluded:
                gs, ws = by.setdefault((g.device, g.dtype, p.dtype), ([], []))
                gs.append(g)
                ws.append(p.detach())
        return [(AGCUnits.split(gs, ws), use_foreach(gs, dev, None) and use_foreach(ws, dev, None), None)
                for (dev, _, _), (gs, ws) in by.items()]

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["excluded"] = self.excluded if self._excluded is not None else None
        return sd

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        super().load_state_dict(state_dict, strict)
        names = state_dict.get("excluded")
        if names is not None and self._plan is not None:
            self._remove_hooks()
            self._set_excluded({self._plan.index(n) for n in names}, "from the checkpoint")


# ---------------------------------------------------------------------------------------------
class AutoClipState(NamedTuple):
    """AutoClip's state: a ring buffer of accepted global norms and how many were written."""

    history: Tensor  # (window,) float64; slots >= count are unused
    count: Tensor  # 0-dim int64, norms written so far (the write index is count % window)


class AutoClip(ClipPolicy):
    r"""AutoClip: clip to the p-th percentile of the global norms seen so far (recent; 2020).

    .. math::
        \eta_t = \operatorname{percentile}_p(\{\lVert g_s \rVert\}_{s \in H_t}),\qquad
        g \leftarrow g \cdot \min\left(1, \frac{\eta_t}{\lVert g_t \rVert + \epsilon}\right)

    This is the **paper's global algorithm** (Algorithm 1, the authors' reference code
    ``pseeth/autoclip``): the current norm is appended to the history *before* the percentile is
    taken (``include_current=True``), p is in 0..100, default 10, with numpy's linear
    interpolation. The history is a device ring buffer of the last ``window`` accepted norms
    (the paper keeps every norm; a window bounds memory and time) and the percentile is a
    sort + gather + lerp on the device: no host sync.

    Where the references disagree (``specs/oracles.md`` section 1e):

    * PyPI ``autoclip`` 0.2.1 (``QuantileClip``) **excludes the current norm** (its first step is
      never clipped): use ``include_current=False`` for parity with
      ``QuantileClip(global_threshold=True)``;
    * it takes q in 0..1 (``quantile=0.9``) where the paper takes p in 0..100 (``p=10``): its
      default is the 90th percentile, the paper recommends the 10th;
    * it defaults to **per-parameter ("local")** thresholds (``global_threshold=False``); only its
      global mode is the paper's algorithm, and only that is implemented here;
    * its history keeps NaN/Inf norms (one NaN step makes every later step's gradients NaN for
      the whole window); here a non-finite or skipped step is never written.

    Args:
        percentile: p in [0, 100]; 100 never clips, 0 clips to the smallest norm seen. Default: 10.
        window: how many past norms the percentile is taken over. Default: 1000.
        include_current: append the current norm before taking the percentile (the paper);
            False for PyPI ``autoclip``'s convention. Default: True.
        max_norm: an optional fixed cap, ``threshold = min(percentile, max_norm)``. Default: None.
        eps: 1e-6 (torch's clip convention, which both references use) or 0.

    Example:
        >>> import gradguard as gg
        >>> gg.AutoClip(percentile=10, window=1000)
        AutoClip(percentile=10.0, window=1000, include_current=True, max_norm=None, eps=1e-06)

    References:
        Seetharaman, Wichern, Pardo, Le Roux, "AutoClip: Adaptive Gradient Clipping for Source
        Separation Networks", MLSP 2020 (arXiv:2007.14469).
    """

    state: AutoClipState

    def __init__(self, percentile: float = 10.0, window: int = 1000, include_current: bool = True,
                 max_norm: float | None = None, *, eps: float = 1e-6) -> None:
        super().__init__()
        if isinstance(percentile, (int, float)) and not isinstance(percentile, bool) and 0 < percentile < 1:
            log.debug("AutoClip percentile %s is in 0..100; PyPI autoclip's quantile=%s is p=%s",
                      percentile, percentile, percentile * 100)
        self.percentile = check_probability("percentile", percentile, low=0.0, high=100.0)
        self.window = check_int("window", window, minimum=1, fix="The paper keeps every norm; 1000 is the usual window.")
        if not isinstance(include_current, bool):
            raise TypeError(f"`include_current` must be a bool, got {include_current!r}.")
        self.include_current = include_current
        self.max_norm = None if max_norm is None else check_positive(
            "max_norm", max_norm, "Pass a positive cap, or None for no cap."
        )
        self.eps = _check_eps(eps)

    def _config(self) -> dict[str, Any]:
        return {"percentile": self.percentile, "window": self.window,
                "include_current": self.include_current, "max_norm": self.max_norm, "eps": self.eps}

    def _init_state(self, device: torch.device) -> None:
        dt = _stat_dtype(device)
        self.state = AutoClipState(
            history=torch.zeros(self.window, dtype=dt, device=device),
            count=torch.zeros((), dtype=torch.int64, device=device),
        )
        self._slots = torch.arange(self.window, device=device)
        self._inf = torch.full((), math.inf, dtype=dt, device=device)

    def _write(self, st: AutoClipState, norm: Tensor, accept: Tensor) -> AutoClipState:
        slot = (self._slots == torch.remainder(st.count, self.window)) & accept
        return AutoClipState(torch.where(slot, norm, st.history), st.count + accept)

    def _threshold(self, st: AutoClipState) -> Tensor:
        n_valid = torch.clamp(st.count, max=self.window)
        ordered = torch.sort(torch.where(self._slots < n_valid, st.history, self._inf)).values
        last = torch.clamp(n_valid - 1, min=0)
        # numpy's linear interpolation: position q * (n - 1), between its floor and the next
        # (the floor never exceeds n - 1: q <= 1).
        pos = (self.percentile / 100.0) * last.to(ordered.dtype)
        lo = pos.floor()
        lo_i = lo.to(torch.int64)
        hi_i = torch.minimum(lo_i + 1, last)
        # torch.lerp switches formula at weight 0.5 exactly as numpy's and torch.quantile's do.
        tau = torch.lerp(torch.take(ordered, lo_i), torch.take(ordered, hi_i), pos - lo)
        tau = torch.where(n_valid > 0, tau, self._inf)
        if self.max_norm is not None:
            tau = torch.clamp(tau, max=self.max_norm)
        return tau

    def clip_(self, params: Sequence[Tensor], grads: Sequence[Tensor | None], stats: GradStats,
              skip: Tensor) -> tuple[Tensor, Tensor]:
        total = stats.global_norm
        st = self.state
        norm = total.to(st.history.dtype)
        accept = ~(skip | stats.nonfinite)
        if self.include_current:
            st = self._write(st, norm, accept)
            tau = self._threshold(st)
        else:
            tau = self._threshold(st)
            st = self._write(st, norm, accept)
        self.state = st
        thr = tau.to(total.dtype)
        coef = torch.where(accept, clip_coef(total, thr, self.eps), 1.0)
        scale_(_present(grads), coef)
        return thr, coef < 1


# ---------------------------------------------------------------------------------------------
class ZClipState(NamedTuple):
    """ZClip's state: the running mean and variance of the accepted norms (:mod:`gradguard._ema`).

    During the warm-up they are the mean and population variance of the norms seen so far
    (gradguard 0.1 kept those in two extra Welford fields, ``w_mean``/``w_m2``, which
    :meth:`ZClip.load_state_dict` converts), then their EMA.
    """

    mean: Tensor  # 0-dim float64: warm-up mean, then EMA of the norm
    var: Tensor  # 0-dim float64: warm-up variance, then EMA of the squared deviation
    count: Tensor  # 0-dim int64, accepted warm-up norms (stops at warmup)


class ZClip(ClipPolicy):
    r"""ZClip: clip norms that are z-score outliers of their EMA (recent; 2025).

    After a warm-up of ``warmup`` accepted norms (their mean and population variance, computed
    with Welford's algorithm, start the EMA), with :math:`z = (g - \mu)/(\sigma + \epsilon)`:

    .. math::
        \tau = \begin{cases}
            \left(\mu + \frac{z_{th}\,\sigma}{z / z_{th}}\right) c & \text{adaptive\_scaling} \\
            \mu & \text{mean}
        \end{cases}
        \ \text{if } z > z_{th},\qquad
        g \leftarrow g \cdot \frac{\tau}{g + 10^{-6}} \ \text{if } g > \tau

    then :math:`\mu \leftarrow \alpha\mu + (1-\alpha)x`,
    :math:`\sigma^2 \leftarrow \alpha\sigma^2 + (1-\alpha)(x - \mu_{new})^2` with ``x`` the clipped
    value on a spike (no update with ``skip_update_on_spike``). ``mode="percentile"`` clips to
    :math:`\mu + z_{th}\sigma` whenever the norm exceeds it.

    It matches PyPI ``zclip`` 1.0.0 (``zclip.ZClip.step``) to 1e-12 on the same norms, including
    where its docstring and code disagree (``clip_factor`` multiplies the whole threshold, mean
    included, as the code does). Differences, all deliberate:

    * **``max_norm=None`` by default.** zclip defaults ``max_grad_norm=1.0`` (its code and its
      README; only its docstring's "float or None" hints at None), which clips every warm-up
      step to 1.0 and caps every later threshold at 1.0; pass ``max_norm=1.0`` for parity.
    * **Non-finite norms never enter the statistics.** In zclip one NaN step sets the mean to NaN
      for good (a later 50x spike then passes unclipped); here the state is untouched and the
      Guard skips the step.
    * Norms are accumulated in float32 or better (zclip uses the first parameter's dtype, so a
      bf16 model gets a bf16 norm); the statistics are float64 device tensors, checkpointed
      (zclip has no ``state_dict``, so a resumed run restarts its warm-up); no host sync (zclip
      reads the norm with ``.item()`` every step).

    Args:
        alpha: EMA smoothing factor in (0, 1). Default: 0.97.
        z_thresh: z-score above which a norm is a spike. Default: 2.5.
        warmup: norms collected before the EMA starts (clipped only by ``max_norm``). Default: 25.
        eps: added to sigma in the z-score. Default: 1e-6.
        mode: ``"zscore"`` or ``"percentile"``. Default: ``"zscore"``.
        clip_option: ``"adaptive_scaling"`` or ``"mean"`` (zscore mode only).
        clip_factor: multiplies the adaptive threshold (0.5-0.9 clips harder). Default: 1.0.
        skip_update_on_spike: keep the EMA unchanged on a spike. Default: False.
        max_norm: optional fixed cap on the threshold, also applied during warm-up. Default: None.

    Example:
        >>> import gradguard as gg
        >>> gg.ZClip(alpha=0.97, z_thresh=2.5, warmup=25).max_norm is None
        True

    References:
        Kumar, Owen, Roy Chowdhury, Gura, "ZClip: Adaptive Spike Mitigation for LLM
        Pre-Training", 2025 (arXiv:2504.02507); PyPI ``zclip`` 1.0.0.
    """

    state: ZClipState

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup: int = 25,
                 eps: float = 1e-6, mode: str = "zscore", clip_option: str = "adaptive_scaling",
                 clip_factor: float = 1.0, skip_update_on_spike: bool = False,
                 max_norm: float | None = None) -> None:
        super().__init__()
        self.alpha = check_probability("alpha", alpha, open_low=True, open_high=True)
        self.z_thresh = check_positive("z_thresh", z_thresh, "ZClip's paper uses z_thresh=2.5.")
        self.warmup = check_int("warmup", warmup, minimum=1, fix="ZClip's default is 25 steps.")
        self.eps = check_positive("eps", eps, "Use a small constant such as 1e-6.")
        self.mode = check_choice("mode", mode, ("zscore", "percentile"))
        self.clip_option = check_choice("clip_option", clip_option, ("adaptive_scaling", "mean"))
        self.clip_factor = check_positive("clip_factor", clip_factor, "1.0 is ZClip's default; 0.5-0.9 clips harder.")
        if not isinstance(skip_update_on_spike, bool):
            raise TypeError(f"`skip_update_on_spike` must be a bool, got {skip_update_on_spike!r}.")
        self.skip_update_on_spike = skip_update_on_spike
        self.max_norm = None if max_norm is None else check_positive(
            "max_norm", max_norm, "Pass a positive cap (zclip's code default is 1.0), or None."
        )

    def _config(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "z_thresh": self.z_thresh, "warmup": self.warmup,
                "eps": self.eps, "mode": self.mode, "clip_option": self.clip_option,
                "clip_factor": self.clip_factor, "skip_update_on_spike": self.skip_update_on_spike,
                "max_norm": self.max_norm}

    def _init_state(self, device: torch.device) -> None:
        dt = _stat_dtype(device)
        z = torch.zeros((), dtype=dt, device=device)
        self.state = ZClipState(z, z.clone(), torch.zeros((), dtype=torch.int64, device=device))
        self._consts = (torch.ones((), dtype=dt, device=device),
                        torch.full((), math.inf, dtype=dt, device=device))

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        saved = state_dict.get("state")
        if isinstance(saved, dict) and "w_mean" in saved:
            # gradguard 0.1 kept the warm-up in Welford fields (mean, sum of squared deviations).
            warm = saved["count"] < self.warmup
            n = saved["count"].clamp(min=1).to(saved["w_m2"].dtype)
            saved = {**saved, "mean": torch.where(warm, saved["w_mean"], saved["mean"]),
                     "var": torch.where(warm, saved["w_m2"] / n, saved["var"])}
            saved = {k: v for k, v in saved.items() if k not in ("w_mean", "w_m2")}
            state_dict = {**state_dict, "state": saved}
        super().load_state_dict(state_dict, strict)

    def clip_(self, params: Sequence[Tensor], grads: Sequence[Tensor | None], stats: GradStats,
              skip: Tensor) -> tuple[Tensor, Tensor]:
        # Every line is a handful of 0-dim ops; ~45 in all (the per-step cost of a small model).
        total = stats.global_norm
        st = self.state
        one, inf = self._consts
        g = total.to(st.mean.dtype)
        finite = ~stats.nonfinite
        accept = finite & ~skip
        warm = st.count < self.warmup
        ready = ~warm

        # After warm-up: z-score against the EMA (the state before this step).
        std = torch.sqrt(st.var)
        se = std + self.eps
        z = (g - st.mean) / se
        zt = self.z_thresh
        if self.mode == "percentile":
            bound = st.mean + zt * std
            spike = g > bound
            tau_spike = bound
        else:
            bound = st.mean + zt * se
            spike = z > zt
            if self.clip_option == "adaptive_scaling":
                tau_spike = st.mean + (zt * std) / (z / zt)
                if self.clip_factor != 1.0:
                    tau_spike = tau_spike * self.clip_factor
            else:
                tau_spike = st.mean
        spike = spike & (ready & finite)
        # What the EMA is fed (zclip's rule): the clipped value on a spike, else the norm.
        fed = torch.where(spike, tau_spike, g)
        do_ema = accept & ready
        if self.max_norm is None:
            effective = fed
            # During the warm-up (and on a skipped step) the gradients are left alone.
            coef = torch.where(do_ema & (g > effective), effective / (g + 1e-6), one)
            threshold = torch.where(warm, inf, torch.where(spike, effective, bound))
        else:  # zclip clips warm-up steps with torch's clip_grad_norm_, and caps every threshold
            effective = torch.clamp(fed, max=self.max_norm)
            bound = torch.clamp(bound, max=self.max_norm)
            coef_ready = torch.where(g > effective, effective / (g + 1e-6), one)
            coef_warm = torch.clamp(self.max_norm / (g + 1e-6), max=1.0)
            coef = torch.where(accept, torch.where(warm, coef_warm, coef_ready), one)
            threshold = torch.where(warm, self.max_norm, torch.where(spike, effective, bound))

        if self.skip_update_on_spike:
            do_ema = do_ema & ~spike
        self.state = ZClipState(*running_update(st, fed, accept, do_ema, self.alpha, self.warmup, warm))
        coef = coef.to(total.dtype)
        scale_(_present(grads), coef)
        return threshold.to(total.dtype), coef < 1
