"""Clipping policies: threshold rules with explicit, checkpointable device state.

A policy is a rule plus a typed state record, in the manner of optax's transforms. The
:class:`gradguard.Guard` drives it once per optimizer step through a two-call protocol:

* ``bind(model, plan)`` once, when the Guard is created: learn the parameters (and, for AGC, find
  the output head) and put the state on the gradients' device;
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

import logging
import math
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
from gradguard._ema import warmup_then_ema
from gradguard._plan import ParamPlan, display_name
from gradguard.clip import _check_eps, clip_coef, scale_
from gradguard.stats import GradStats, acc_dtype

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

    def _config(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm, "norm_type": self.norm_type, "eps": self.eps}

    def clip_(self, params: Sequence[Tensor], grads: Sequence[Tensor | None], stats: GradStats,
              skip: Tensor) -> tuple[Tensor, Tensor]:
        total = stats.global_norm
        if self._thr is None or self._thr.device != total.device or self._thr.dtype != total.dtype:
            self._thr = torch.full((), self.max_norm, dtype=total.dtype, device=total.device)
        coef = clip_coef(total, self._thr, self.eps)
        coef = torch.where(skip | stats.nonfinite, torch.ones_like(coef), coef)
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
def _unit_norm(t: Tensor, acc: torch.dtype) -> Tensor:
    if t.ndim <= 1:
        return torch.linalg.vector_norm(t, 2, dtype=acc)
    return torch.linalg.vector_norm(t, 2, dim=tuple(range(1, t.ndim)), keepdim=True, dtype=acc)


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


class AGC(ClipPolicy):
    r"""Adaptive gradient clipping, unit-wise (Brock et al. 2021), with the output head excluded.

    For every output unit ``u`` (a row of a Linear/Conv/Embedding weight in torch's (out, in, ...)
    layout; the whole tensor for biases and norm gains):

    .. math::
        m_u = \lambda \max(\lVert W_u \rVert_2, \epsilon),\qquad
        G_u \leftarrow G_u \cdot \frac{m_u}{\max(\lVert G_u \rVert_2, 10^{-6})}
        \ \text{ if } \lVert G_u \rVert_2 \ge m_u

    It matches timm's ``adaptive_clip_grad`` (optax keeps at strict ``<``; they differ only at
    equality). **The head is found from the module structure**, not, as in timm, by dropping
    "the last two parameters": with ``exclude="auto"`` the policy traces the first forward pass
    after it is bound and excludes the last ``nn.Linear`` whose output *is* the model's output
    (same storage: ``logits.view(...)`` counts). If the model transforms the head's output
    (``log_softmax``), the last Linear called in that forward is taken; if no forward pass was
    seen before the first step, the last ``nn.Linear`` in module order (a documented fallback,
    logged at INFO).

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
            self._excluded = self._resolve_names(model, plan, self._exclude_spec)

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
        self._excluded = {i for i, p in enumerate(plan.params) if id(p) in ids}
        log.info("AGC: excluding head %r (%s): %s", display_name(module_name), how, self.excluded)

    def _fallback_head(self) -> None:
        model, _ = self._bound()
        self._remove_hooks()
        last = None
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear):
                last = name
        if last is None:
            self._excluded = set()
            log.info("AGC: no nn.Linear in the model, so no head is excluded")
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

    def clip_(self, params: Sequence[Tensor], grads: Sequence[Tensor | None], stats: GradStats,
              skip: Tensor) -> tuple[Tensor, Tensor]:
        if self._excluded is None:
            self._fallback_head()
        excluded = self._excluded or set()
        total = stats.global_norm
        keep = ~skip
        hits: list[Tensor] = []
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                if g is None or i in excluded:
                    continue
                acc = acc_dtype(g.dtype)
                max_norm = _unit_norm(p.detach(), acc).clamp_min(self.eps).mul_(self.clipping)
                g_norm = _unit_norm(g, acc)
                trig = (g_norm >= max_norm) & keep.to(g.device)
                factor = torch.where(trig, max_norm / g_norm.clamp_min(1e-6), 1.0)
                g.mul_(factor.to(g.dtype))
                hits.append(trig.any().to(total.device))
        clipped = torch.stack(hits).any() if hits else torch.zeros((), dtype=torch.bool, device=total.device)
        return torch.full((), math.inf, dtype=total.dtype, device=total.device), clipped

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["excluded"] = self.excluded if self._excluded is not None else None
        return sd

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        super().load_state_dict(state_dict, strict)
        names = state_dict.get("excluded")
        if names is not None and self._plan is not None:
            self._remove_hooks()
            self._excluded = {self._plan.index(n) for n in names}


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

    def _write(self, st: AutoClipState, norm: Tensor, accept: Tensor) -> AutoClipState:
        idx = torch.remainder(st.count, self.window).reshape(1)
        old = st.history.index_select(0, idx)
        new = torch.where(accept, norm.reshape(1), old)
        return AutoClipState(st.history.index_copy(0, idx, new), st.count + accept.to(torch.int64))

    def _threshold(self, st: AutoClipState) -> Tensor:
        w = self.window
        n_valid = torch.clamp(st.count, max=w)
        slots = torch.arange(w, device=st.history.device)
        ordered = torch.sort(torch.where(slots < n_valid, st.history, math.inf)).values
        last = torch.clamp(n_valid - 1, min=0)
        pos = (self.percentile / 100.0) * last.to(ordered.dtype)
        lo = torch.minimum(pos.floor().to(torch.int64), last)
        hi = torch.minimum(lo + 1, last)
        v_lo = ordered.index_select(0, lo.reshape(1))
        v_hi = ordered.index_select(0, hi.reshape(1))
        # torch.lerp switches formula at weight 0.5 exactly as numpy's and torch.quantile's do.
        tau = torch.lerp(v_lo, v_hi, (pos - lo.to(pos.dtype)).reshape(1)).reshape(())
        tau = torch.where(n_valid > 0, tau, math.inf)
        if self.max_norm is not None:
            tau = torch.clamp(tau, max=self.max_norm)
        return tau

    def clip_(self, params: Sequence[Tensor], grads: Sequence[Tensor | None], stats: GradStats,
              skip: Tensor) -> tuple[Tensor, Tensor]:
        total = stats.global_norm
        st = self.state
        norm = total.to(st.history.dtype)
        accept = ~skip & torch.isfinite(norm)
        if self.include_current:
            st = self._write(st, norm, accept)
            tau = self._threshold(st)
        else:
            tau = self._threshold(st)
            st = self._write(st, norm, accept)
        self.state = st
        thr = tau.to(total.dtype)
        coef = clip_coef(total, thr, self.eps)
        coef = torch.where(accept, coef, torch.ones_like(coef))
        scale_(_present(grads), coef)
        return thr, coef < 1


# ---------------------------------------------------------------------------------------------
class ZClipState(NamedTuple):
    """ZClip's state: the EMA mean and variance, and the Welford warm-up accumulators."""

    mean: Tensor  # 0-dim float64 EMA of the norm (valid once count == warmup)
    var: Tensor  # 0-dim float64 EMA of the squared deviation
    count: Tensor  # 0-dim int64, accepted warm-up norms (stops at warmup)
    w_mean: Tensor  # Welford running mean over the warm-up
    w_m2: Tensor  # Welford running sum of squared deviations


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
        self.state = ZClipState(z, z.clone(), torch.zeros((), dtype=torch.int64, device=device),
                                z.clone(), z.clone())

    def clip_(self, params: Sequence[Tensor], grads: Sequence[Tensor | None], stats: GradStats,
              skip: Tensor) -> tuple[Tensor, Tensor]:
        total = stats.global_norm
        st = self.state
        g = total.to(st.mean.dtype)
        finite = torch.isfinite(g)
        accept = ~skip & finite
        warm = st.count < self.warmup
        inf = torch.full_like(g, math.inf)

        # After warm-up: z-score against the EMA (the state before this step).
        std = torch.sqrt(st.var)
        z = (g - st.mean) / (std + self.eps)
        if self.mode == "percentile":
            bound = st.mean + self.z_thresh * std
            spike = g > bound
            tau_spike = bound
        else:
            bound = st.mean + self.z_thresh * (std + self.eps)
            spike = z > self.z_thresh
            if self.clip_option == "adaptive_scaling":
                eta = z / self.z_thresh
                tau_spike = (st.mean + (self.z_thresh * std) / eta) * self.clip_factor
            else:
                tau_spike = st.mean
        spike = spike & ~warm & finite
        effective = torch.where(spike, tau_spike, g)
        if self.max_norm is not None:
            effective = torch.clamp(effective, max=self.max_norm)
            bound = torch.clamp(bound, max=self.max_norm)
        coef_ready = torch.where(g > effective, effective / (g + 1e-6), torch.ones_like(g))
        if self.max_norm is not None:  # zclip clips warm-up steps with torch's clip_grad_norm_
            coef_warm = torch.clamp(self.max_norm / (g + 1e-6), max=1.0)
            thr_warm = torch.full_like(g, self.max_norm)
        else:
            coef_warm, thr_warm = torch.ones_like(g), inf
        coef = torch.where(warm, coef_warm, coef_ready)
        coef = torch.where(accept, coef, torch.ones_like(coef))
        threshold = torch.where(warm, thr_warm, torch.where(spike, effective, bound))

        # Warm-up: Welford over the accepted norms; the warmup-th one starts the EMA, which is
        # fed with the clipped value on a spike (zclip's rule).
        x = torch.where(spike, tau_spike, g)
        do_ema = accept & ~warm
        if self.skip_update_on_spike:
            do_ema = do_ema & ~spike
        self.state = ZClipState(*warmup_then_ema(st, g, accept, x, do_ema, self.alpha, self.warmup))
        coef = coef.to(total.dtype)
        scale_(_present(grads), coef)
        return threshold.to(total.dtype), coef < 1
