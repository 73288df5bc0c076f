"""ParamPlan: which tensors a Guard watches, in which order, in which (device, dtype) groups.

Built once, when a :class:`gradguard.Guard` is created, so the per-step path never walks the
module tree again. "Module order" is the order of ``model.named_parameters()``: registration
order, depth first, each shared (tied) parameter once, under its first name. Every per-layer
column in a :class:`gradguard.History` and every "first layer that went non-finite" message uses
this order.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import nn

from gradguard.stats import acc_dtype, group_by_device_dtype

__all__ = ["ParamPlan"]

_GRAD = operator.attrgetter("grad")


@dataclass(frozen=True)
class ParamPlan:
    """The parameters that require grad, their qualified names, and their (device, dtype) groups.

    Attributes:
        names: qualified parameter names (``"encoder.0.weight"``), in module order.
        params: the parameters, aligned with ``names``.
        groups: ``(device, dtype) -> indices into params``, in first-seen order.
        device: the device of the first parameter (where statistics and policy state live).
        norm_dtype: the dtype of the global norm: float64 if any parameter is float64, else
            float32 (the accumulation dtype of :mod:`gradguard.stats`).
    """

    names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]
    groups: dict[tuple[torch.device, torch.dtype], list[int]]
    device: torch.device
    norm_dtype: torch.dtype

    @classmethod
    def from_module(cls, model: nn.Module) -> ParamPlan:
        """Plan the parameters of ``model`` that require grad.

        Raises:
            TypeError: ``model`` is not an ``nn.Module``.
            ValueError: ``model`` has no parameter that requires grad.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"`model` must be a torch.nn.Module, got {type(model).__name__}. Pass the module "
                "whose parameters the optimizer updates (e.g. Guard(model, ...))."
            )
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(
                "`model` has no parameter with requires_grad=True, so there are no gradients to "
                "guard. Unfreeze at least one parameter, or pass the trainable sub-module."
            )
        names = tuple(n for n, _ in named)
        params = tuple(p for _, p in named)
        dtypes = {acc_dtype(p.dtype) for p in params}
        norm_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        return cls(
            names=names,
            params=params,
            groups=group_by_device_dtype(params),
            device=params[0].device,
            norm_dtype=norm_dtype,
        )

    def __len__(self) -> int:
        return len(self.params)

    def index(self, name: str) -> int:
        """Position of the parameter called ``name`` (KeyError listing known names if absent)."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(
                f"no trainable parameter named {name!r}; known names include {list(self.names[:6])}"
            ) from None

    def grads(self) -> list[torch.Tensor | None]:
        """The current ``.grad`` of every planned parameter (None where there is none)."""
        return list(map(_GRAD, self.params))  # map runs in C: ~2x faster for thousands of tensors
