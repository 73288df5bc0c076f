"""Per-tensor and global gradient statistics from one pass over the gradients.

The pass is the one norm clipping needs anyway (torch's ``_foreach_norm`` per (device, dtype)
group), so per-layer statistics cost nothing extra. Everything stays on the device: no host sync.

Accumulation dtype is ``max(float32, grad dtype)``: fp16/bf16 gradients are reduced in float32 and
never overflow the norm (torch returns ``inf`` in fp16 for a total above 65504); float64 stays
float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from gradguard._checks import as_tensor_list, check_norm_type

__all__ = ["GradStats", "grad_stats"]

try:  # torch's own answer to "may this device use the foreach kernels?"
    from torch.utils._foreach_utils import _device_has_foreach_support
except ImportError:  # pragma: no cover - very old or very new torch

    def _device_has_foreach_support(device: torch.device) -> bool:
        return device.type in ("cpu", "cuda")


_FOREACH_TYPES = (Tensor, torch.nn.Parameter)


class GradStats(NamedTuple):
    """Gradient statistics from one pass; every field is a device tensor.

    Attributes:
        global_norm: 0-dim tensor, the ``norm_type``-norm of all gradients viewed as one vector,
            in the accumulation dtype (``max(float32, grad dtype)``).
        per_tensor_norm: 1-D tensor aligned with the parameters passed in (``0`` where a
            parameter has no gradient), on the first gradient's device.
        nonfinite: 0-dim bool tensor, True when the global norm is NaN or Inf. It is derived
            from the reduction itself (no separate ``isfinite`` pass), so it is also True when a
            finite gradient is so large that its norm overflows (|g| >~ 1.8e19 in float32 for
            p = 2): treat such a step as exploded.
        norm_type: the order of the norm, as a float.
    """

    global_norm: Tensor
    per_tensor_norm: Tensor
    nonfinite: Tensor
    norm_type: float


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for gradients of ``dtype``: never below float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def use_foreach(tensors: Sequence[Tensor], device: torch.device, foreach: bool | None) -> bool:
    """Torch's rule: ``None`` picks foreach where supported; ``True`` on an unsupported device raises."""
    if foreach is None:
        return _device_has_foreach_support(device) and all(
            type(t) in _FOREACH_TYPES for t in tensors
        )
    if foreach and not _device_has_foreach_support(device):
        raise RuntimeError(
            f"foreach=True was passed, but can't use the foreach API on {device.type} tensors"
        )
    return bool(foreach)


def group_by_device_dtype(
    tensors: Sequence[Tensor | None],
) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of the non-None tensors, bucketed by (device, dtype), in first-seen order."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        if t is not None:
            groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def tensor_norms(
    tensors: Sequence[Tensor | None], norm_type: float, foreach: bool | None = None
) -> list[Tensor | None]:
    """The ``norm_type``-norm of each tensor (None stays None), accumulated in ``acc_dtype``.

    One ``_foreach_norm`` per (device, dtype) group, or one ``vector_norm`` per tensor where the
    foreach kernels do not apply (e.g. DTensor gradients).
    """
    out: list[Tensor | None] = [None] * len(tensors)
    for (device, dtype), idx in group_by_device_dtype(tensors).items():
        group = [tensors[i] for i in idx]
        acc = acc_dtype(dtype)
        # dtype=None for fp32/fp64 keeps the exact kernel torch.nn.utils uses (bitwise parity).
        kw_dtype = None if acc == dtype else acc
        if use_foreach(group, device, foreach):
            norms = torch._foreach_norm(group, norm_type, dtype=kw_dtype)
        else:
            norms = [torch.linalg.vector_norm(g, norm_type, dtype=kw_dtype) for g in group]
        for i, n in zip(idx, norms):
            out[i] = n
    return out


def reduce_norms(norms: Sequence[Tensor], norm_type: float) -> Tensor:
    """Combine per-tensor norms into the global norm, on the first tensor's device."""
    first = norms[0].device
    stacked = torch.stack([n if n.device == first else n.to(first) for n in norms])
    return torch.linalg.vector_norm(stacked, norm_type)


def compute_stats(
    grads: Sequence[Tensor | None], norm_type: float, foreach: bool | None = None
) -> GradStats:
    """:func:`grad_stats` on an already validated list of gradients (None allowed)."""
    norms = tensor_norms(grads, norm_type, foreach)
    present = [n for n in norms if n is not None]
    if not present:
        zero = torch.tensor(0.0)
        return GradStats(zero, torch.zeros(len(grads)), torch.tensor(False), norm_type)
    first = present[0].device
    if len(present) == len(norms):
        per_tensor = torch.stack([n if n.device == first else n.to(first) for n in present])
        total = torch.linalg.vector_norm(per_tensor, norm_type)
    else:
        total = reduce_norms(present, norm_type)
        zero = torch.zeros((), dtype=total.dtype, device=first)
        per_tensor = torch.stack(
            [zero if n is None else n.to(device=first, dtype=total.dtype) for n in norms]
        )
    if norm_type == -math.inf:
        # A minimum does not propagate Inf, so the flag needs its own (L1) reduction here.
        l1 = reduce_norms([n for n in tensor_norms(grads, 1.0, foreach) if n is not None], 1.0)
        nonfinite = ~torch.isfinite(l1)
    else:
        # NaN and Inf always reach a sum of |g|^p or a max: the flag comes for free.
        nonfinite = ~torch.isfinite(total)
    return GradStats(total, per_tensor, nonfinite, norm_type)


@torch.no_grad()
def grad_stats(
    parameters: Tensor | Iterable[Tensor], norm_type: float | str = 2.0, foreach: bool | None = None
) -> GradStats:
    """Per-tensor norms, the global norm and a non-finite flag, from one pass, without a host sync.

    Args:
        parameters (Tensor or iterable of Tensors): parameters whose ``.grad`` is read.
        norm_type (float or str, optional): order of the norm, > 0 or ``'inf'``. Default: 2.0.
        foreach (bool, optional): use the foreach kernels (``None`` picks them where supported,
            as ``torch.nn.utils`` does). Default: None.

    Returns:
        GradStats: device tensors; ``per_tensor_norm[i]`` belongs to the i-th parameter passed.

    Example:
        >>> import torch, gradguard as gg
        >>> w = torch.nn.Parameter(torch.ones(2)); w.grad = torch.tensor([3.0, 4.0])
        >>> s = gg.grad_stats([w])
        >>> float(s.global_norm), bool(s.nonfinite)
        (5.0, False)
    """
    p = check_norm_type(norm_type)
    params = as_tensor_list(parameters)
    return compute_stats([t.grad for t in params], p, foreach)
