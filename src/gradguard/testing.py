"""Test helpers for users and for gradguard's own suite: count host syncs on any device.

``count_host_syncs()`` counts every read of a device value by the host: ``aten::_local_scalar_dense``
(``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``, ``if t:``, a 0-dim tensor used as an index),
``aten::equal``, copies from a non-CPU device to the CPU, ``Tensor.tolist()``/``Tensor.numpy()``
(so ``repr(t)`` and numpy conversion, ``np.asarray(t)``), and ``torch.tensor``/``torch.as_tensor``/
``torch.asarray`` given a (nested) list or tuple that holds tensors, which reads every such tensor
(``torch.tensor([t0, t1])`` counts 2; torch reads them below the dispatcher, where a dispatch mode
cannot see it). On CPU these cost nothing, but each is a stall on a GPU; counting them on CPU
catches the code paths that would stall.

Not seen: a read made inside one aten op's own C++ code (the mode sees the op, not what it calls;
e.g. ``torch.segment_reduce`` validating its lengths unless ``unsafe=True``), the legacy constructors (``torch.Tensor([t0])``, ``torch.FloatTensor([t0])``) and code
that bound ``torch.tensor`` to another name before the counter started.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SyncCounter", "count_host_syncs"]

_SYNC_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.is_nonzero.default,
}


_FACTORIES = ("tensor", "as_tensor", "asarray")


def _tensors_inside(data: Any, depth: int = 0) -> int:
    """How many tensors a (nested) list/tuple passed to a tensor factory holds."""
    if isinstance(data, (list, tuple)) and depth < 32:
        return sum(1 if isinstance(x, torch.Tensor) else _tensors_inside(x, depth + 1) for x in data)
    return 0


class SyncCounter(TorchDispatchMode):
    """A dispatch mode that counts host reads; ``count`` and ``ops`` (op names) are kept, and
    ``dispatched``, every aten op run inside the block (the per-step fixed cost on a small
    model: each op is a kernel launch on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.ops: list[str] = []
        self.dispatched = 0

    def _hit(self, name: str) -> None:
        self.count += 1
        self.ops.append(name)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        self.dispatched += 1
        if func in _SYNC_OPS:
            self._hit(str(func))
        elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[0] if func is torch.ops.aten._to_copy.default else args[1]
            dst_dev = kwargs.get("device") if func is torch.ops.aten._to_copy.default else args[0].device
            if (
                isinstance(src, torch.Tensor)
                and src.device.type != "cpu"
                and dst_dev is not None
                and torch.device(dst_dev).type == "cpu"
            ):
                self._hit(f"{func} to cpu")
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_syncs() -> Iterator[SyncCounter]:
    """Context manager yielding a :class:`SyncCounter` whose ``count`` grows with each host read.

    Example:
        >>> import torch
        >>> from gradguard.testing import count_host_syncs
        >>> with count_host_syncs() as c:
        ...     _ = torch.ones(3).sum().item()
        >>> c.count
        1
    """
    counter = SyncCounter()
    orig_tolist, orig_numpy = torch.Tensor.tolist, torch.Tensor.numpy
    orig_factories = {name: getattr(torch, name) for name in _FACTORIES}

    def factory(name: str, fn: Any) -> Any:
        def wrapped(data: Any, *a: Any, **k: Any) -> Any:
            n = _tensors_inside(data)
            for _ in range(n):
                counter._hit(f"torch.{name}(a list holding tensors)")
            return fn(data, *a, **k)

        return wrapped

    def tolist(self, *a, **k):  # type: ignore[no-untyped-def]
        counter._hit("Tensor.tolist")
        return orig_tolist(self, *a, **k)

    def numpy(self, *a, **k):  # type: ignore[no-untyped-def]
        counter._hit("Tensor.numpy")
        return orig_numpy(self, *a, **k)

    torch.Tensor.tolist, torch.Tensor.numpy = tolist, numpy  # type: ignore[method-assign]
    for name, fn in orig_factories.items():
        setattr(torch, name, factory(name, fn))
    try:
        with counter:
            yield counter
    finally:
        torch.Tensor.tolist, torch.Tensor.numpy = orig_tolist, orig_numpy  # type: ignore[method-assign]
        for name, fn in orig_factories.items():
            setattr(torch, name, fn)
