"""Validators shared by every public entry point: one error style.

Every error names the argument, the value it got and the fix, in the manner of einops and
safetensors. Validation happens once, at the public boundary, on Python numbers; nothing here
reads a device tensor.
"""

from __future__ import annotations

import importlib
import logging
import math
import numbers
import types
import warnings
from collections.abc import Iterable
from typing import Any

import torch

__all__ = [
    "as_tensor_list",
    "check_state_config",
    "check_state_tensors",
    "require",
    "check_choice",
    "check_int",
    "check_iterable",
    "check_norm_type",
    "check_positive",
    "check_probability",
]

log = logging.getLogger("gradguard")


def require(module: str, extra: str) -> Any:
    """Import the optional ``module`` or raise with the exact, one-line install command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ModuleNotFoundError(
            f"this part of gradguard needs `{module.split('.')[0]}`: "
            f'pip install "gradguard[{extra}]"'
        ) from e

_EMPTY_GENERATOR = "`parameters` is an empty generator, no gradient clipping will occur."


def as_tensor_list(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    name: str = "parameters",
    *,
    warning: str | None = _EMPTY_GENERATOR,
    stacklevel: int = 3,
) -> list[torch.Tensor]:
    """Turn a tensor or an iterable of tensors into a list, as ``torch.nn.utils`` does.

    An exhausted generator gives ``warning`` (torch's exact text by default; None: no warning),
    attributed ``stacklevel`` frames up (3: the caller of a plain public function; 4 when that
    function is wrapped by ``torch.no_grad()``). An empty list is allowed silently (as in torch).
    Anything that is not a tensor raises ``TypeError`` naming its position and value.
    """
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    check_iterable(parameters, name)
    is_generator = isinstance(parameters, types.GeneratorType)
    tensors = list(parameters)
    if is_generator and not tensors and warning is not None:
        warnings.warn(warning, stacklevel=stacklevel)
    if not all(issubclass(tp, torch.Tensor) for tp in set(map(type, tensors))):  # fast in C
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                hint = (
                    " It looks like (name, parameter) pairs: pass model.parameters(), not "
                    "model.named_parameters()."
                    if isinstance(t, tuple) and len(t) == 2
                    else ""
                )
                raise TypeError(
                    f"`{name}`[{i}] must be a Tensor, got {type(t).__name__}: {t!r:.60}.{hint}"
                )
    return tensors


def check_iterable(parameters: Any, name: str = "parameters") -> None:
    """``parameters`` must be an iterable (and not a string): raise ``TypeError`` naming it."""
    if isinstance(parameters, (str, bytes)) or not isinstance(parameters, Iterable):
        raise TypeError(
            f"`{name}` must be a Tensor or an iterable of Tensors (e.g. model.parameters()), "
            f"got {type(parameters).__name__}: {parameters!r:.80}."
        )


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"`{name}` must be a number, got a tensor of shape {tuple(value.shape)}.")
        raise TypeError(
            f"`{name}` must be a Python number, got a tensor; pass float(...) of it. "
            "(A tensor here would force a host sync on every call.)"
        )
    # numbers.Real admits numpy scalars (np.float32 is no subclass of float); bool is refused.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}: {value!r:.80}.")
    return float(value)


def check_positive(name: str, value: Any, fix: str = "", *, allow_inf: bool = False) -> float:
    """``value`` must be a finite number > 0 (or +inf when ``allow_inf``)."""
    v = _as_float(name, value)
    ok = v > 0 and (math.isfinite(v) or (allow_inf and v == math.inf))
    if not ok:
        what = "a positive number (or inf)" if allow_inf else "a positive finite number"
        raise ValueError(f"`{name}` must be {what}, got {value!r}. {fix}".rstrip())
    return v


def check_norm_type(norm_type: Any) -> float:
    """``norm_type`` must be > 0 or ±inf (a string such as ``"inf"`` is accepted, as in torch).

    Torch accepts 0 and negative orders and returns a count of non-zeros or a minimum; neither is
    a norm that clipping can use, so gradguard refuses them (a documented deviation).
    """
    if isinstance(norm_type, bool) or isinstance(norm_type, torch.Tensor):
        raise TypeError(f"`norm_type` must be a number or 'inf', got {norm_type!r:.80}.")
    try:
        p = float(norm_type)
    except (TypeError, ValueError):
        kind = ValueError if isinstance(norm_type, str) else TypeError
        raise kind(
            f"`norm_type` must be a number or 'inf', got {norm_type!r:.80}."
        ) from None
    if math.isnan(p) or (p <= 0 and p != -math.inf):
        raise ValueError(
            f"`norm_type` must be a positive number or +/-inf, got {norm_type!r}. "
            "Use 2.0 for the Euclidean norm, 1.0 for the sum of absolute values or 'inf' for "
            "the largest absolute value."
        )
    return p


def check_int(name: str, value: Any, *, minimum: int = 1, fix: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}: {value!r:.80}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}. {fix}".rstrip())
    return value


def check_probability(name: str, value: Any, *, low: float = 0.0, high: float = 1.0,
                      open_low: bool = False, open_high: bool = False) -> float:
    v = _as_float(name, value)
    lo_ok = v > low if open_low else v >= low
    hi_ok = v < high if open_high else v <= high
    if not (lo_ok and hi_ok) or math.isnan(v):
        lb = "(" if open_low else "["
        rb = ")" if open_high else "]"
        raise ValueError(f"`{name}` must lie in {lb}{low}, {high}{rb}, got {value!r}.")
    return v


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    options = tuple(choices)
    if value not in options:
        raise ValueError(
            f"`{name}` must be one of {', '.join(repr(c) for c in options)}; got {value!r}."
        )
    return value


_MISSING = object()


def check_state_config(owner: str, saved: Any, current: dict[str, Any], *, strict: bool = True) -> None:
    """A checkpoint's settings must be the ones this object was built with.

    A policy's state means something only under the settings it was accumulated with (ZClip's
    warm-up count, AutoClip's window): loaded under others it can freeze training or crash a
    later step. ``strict=True`` raises ``ValueError`` naming every mismatching setting;
    ``strict=False`` logs a warning and lets the caller go on (the state's shapes are still
    checked by :func:`check_state_tensors`).
    """
    if not isinstance(saved, dict):
        raise ValueError(f"{owner}: the checkpoint's `config` must be a dict, got {type(saved).__name__}.")
    keys = list(current) + [k for k in saved if k not in current]
    diffs = [k for k in keys if saved.get(k, _MISSING) != current.get(k, _MISSING)]
    if not diffs:
        return

    def show(d: dict[str, Any], k: str) -> str:
        return f"{k}={d[k]!r}" if k in d else f"no {k}"

    msg = (f"{owner}: the checkpoint was saved with {', '.join(show(saved, k) for k in diffs)}, "
           f"but this one has {', '.join(show(current, k) for k in diffs)}")
    if strict:
        raise ValueError(
            f"{msg}. Its state is not valid under other settings; construct the object with the "
            "checkpoint's settings, or pass strict=False to load the state anyway."
        )
    log.warning("%s; loading anyway (strict=False)", msg)


def check_state_tensors(owner: str, saved: Any, current: dict[str, torch.Tensor]) -> None:
    """Every field of ``current`` must be in ``saved`` as a tensor of the same shape."""
    if not isinstance(saved, dict):
        raise ValueError(f"{owner}: the checkpoint's `state` must be a dict, got {type(saved).__name__}.")
    missing = [k for k in current if k not in saved]
    if missing:
        raise ValueError(f"{owner}: the checkpoint's state lacks {missing}; it is not from this version.")
    for k, cur in current.items():
        t = saved[k]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{owner}: state field {k!r} must be a tensor, got {type(t).__name__}.")
        if t.shape != cur.shape:
            raise ValueError(
                f"{owner}: state field {k!r} has shape {tuple(t.shape)} in the checkpoint but "
                f"{tuple(cur.shape)} here (a different configuration); construct the object "
                "with the checkpoint's settings."
            )
