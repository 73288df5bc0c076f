"""Gradient statistics that agree on every rank, from one packed all-reduce per step.

Under data or model parallelism each rank sees part of the picture: FSDP2 and tensor parallelism
shard a parameter's gradient across ranks (DTensor ``Shard`` placements), the loss differs per
rank, and a NaN can appear on one rank only. Every decision gradguard takes from the gradients
(clip coefficient, skip, spike, every policy's state) must nevertheless be *identical* on every
rank: a rank that skips while another steps desynchronises the replicas, and a sharded optimizer
hangs.

:func:`reduce_grad_stats` is the drop-in for :func:`gradguard.stats.compute_stats` that gives
that guarantee. Per step it

1. computes, on each rank, a partial per gradient tensor from its local values
   (``DTensor.to_local()``): ``sum |g|^p`` for a p-norm, ``max |g|`` for the inf-norm;
2. counts a gradient that is replicated across the group **once** (see below);
3. packs ``[per-tensor partials, non-finite count, extras]`` into one float64 buffer and runs
   **one** ``all_reduce`` on it (``SUM``; ``MAX`` for ``norm_type=inf``);
4. takes the p-th roots locally. Every rank holds the same reduced buffer, so every value derived
   from it (global norm, per-tensor norms, the non-finite flag, a policy's threshold and state) is
   bitwise identical across ranks.

No host sync: nothing is read back; on NCCL the all-reduce is queued on the stream.

Counting replicated gradients once
    * ``DTensor`` gradients: along every mesh dimension whose placement is ``Replicate`` only the
      rank at coordinate 0 contributes (e.g. HSDP's replicate dimension, tensor-parallel
      layer-norm weights). ``Shard`` dimensions contribute from every rank. A ``Partial`` gradient
      (unreduced summands, not a shard) is refused.
    * Plain tensors: ``replicated=True`` (default) means every rank holds the same gradient, as
      DDP produces, and only rank 0 of the group contributes; ``replicated=False`` means each rank
      holds a distinct piece (e.g. FSDP1 flat-parameter shards, a hand-rolled ZeRO) and all
      contribute. A sequence of booleans sets it per tensor (Megatron-style tensor-parallel
      duplicates).
    * The same tensor object passed twice (tied weights listed twice) is counted once in the global
      norm (both slots still report its norm). ``model.parameters()`` already lists a tied
      parameter once, and so does FSDP2.

    The non-contributing copies are multiplied by 0, not dropped, so a NaN or Inf on *any* rank
    still reaches the reduced value and every rank sees it.

Why bother under plain DDP?
    DDP averages gradients in ``backward``, so after it every rank holds bitwise-identical
    gradients and a purely local :func:`~gradguard.stats.compute_stats` already gives identical
    norms and decisions. The reduction is still worth its one tiny all-reduce (``n_tensors + 2``
    floats, next to DDP's all-reduce of every gradient) because (a) the loss differs per rank and a
    loss-spike detector or the history needs the mean, passed as ``extras``; (b) a NaN that appears
    on one rank after DDP's reduction (a hook, a buggy custom op) or a setup that does not average
    gradients (``no_sync`` misuse, local SGD, hand-written data parallelism) would otherwise make
    one rank skip while the others step. ``gradguard.Guard`` uses it whenever
    ``torch.distributed`` is initialised with more than one rank.

Extras
    ``extras`` (e.g. ``torch.stack([loss])``) ride in the same buffer. They come back reduced with
    the buffer's op: the **sum** over ranks (divide by the world size for a mean), or the **max**
    when ``norm_type=inf`` (the inf-norm needs ``MAX``, and one collective has one op). A 0/1 flag
    reduced either way is "any rank". NaN in an extra propagates under ``SUM``; under ``MAX``
    backends may drop NaN, so pack flags, not NaNs, when using the inf-norm.

Limits
    * Every rank in ``group`` must pass the same list of gradients (same model structure, same
      order): the per-tensor slots of the buffer are summed position by position. Pipeline
      parallelism, where stages hold different parameters, is not supported by one call; reduce
      each stage's statistics and combine the global norms yourself.
    * Every DTensor's device mesh must span exactly the ranks of ``group`` (``group=None``: the
      default group). For a DTensor on a sub-mesh (e.g. a tensor-parallel mesh inside a larger
      data-parallel world), pass that mesh's group.
    * ``norm_type=-inf`` (a minimum, not a norm) is refused with more than one rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from gradguard.stats import GradStats, acc_dtype, compute_stats, tensor_norms

__all__ = ["has_dtensor", "is_distributed", "reduce_grad_stats", "sharded_update_ratio", "step_stats"]


def _dist():  # type: ignore[no-untyped-def]
    import torch.distributed as dist

    return dist


def is_distributed(group: object | None = None) -> bool:
    """True when ``torch.distributed`` is initialised and ``group`` has more than one rank."""
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1)


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def _local_and_mask(
    grads: Sequence[Tensor | None],
    replicated: Sequence[bool],
    group_rank: int,
    group_size: int,
) -> tuple[list[Tensor | None], list[bool]]:
    """Each gradient's local values and whether this rank's copy counts towards the sum."""
    dtensor = _dtensor_type()
    locals_: list[Tensor | None] = []
    counts: list[bool] = []
    for i, g in enumerate(grads):
        if g is None:
            locals_.append(None)
            counts.append(False)
            continue
        if dtensor is not None and isinstance(g, dtensor):
            mesh = g.device_mesh
            if mesh.size() != group_size:
                raise ValueError(
                    f"gradient {i} is a DTensor on a device mesh of {mesh.size()} ranks, but the "
                    f"process group has {group_size}. Pass `group=` the process group that mesh "
                    "spans (e.g. mesh.get_group() for a 1-D mesh); gradients on several meshes "
                    "need one reduce_grad_stats call per mesh."
                )
            coord = mesh.get_coordinate()
            if coord is None:  # this rank is not in the mesh; cannot happen when sizes match
                raise ValueError(f"gradient {i}: this rank is not part of its DTensor's mesh.")
            mine = True
            for d, placement in enumerate(g.placements):
                if placement.is_partial():
                    raise ValueError(
                        f"gradient {i} is a DTensor with a Partial placement on mesh dim {d}: its "
                        "local values are unreduced summands, so its norm cannot be formed from "
                        "local partial norms. Redistribute it to Shard or Replicate first."
                    )
                if placement.is_replicate() and coord[d] != 0:
                    mine = False
            locals_.append(g.to_local())
            counts.append(mine)
        else:
            locals_.append(g)
            counts.append(group_rank == 0 if replicated[i] else True)
    return locals_, counts


def _first_occurrences(grads: Sequence[Tensor | None]) -> list[bool]:
    """False at the second and later positions of a tensor object listed more than once."""
    seen: set[int] = set()
    out = []
    for g in grads:
        out.append(g is not None and id(g) not in seen)
        if g is not None:
            seen.add(id(g))
    return out


_MASKS: dict[tuple[torch.device, tuple[bool, ...]], Tensor] = {}


def _mask(flags: Sequence[bool], device: torch.device) -> Tensor:
    """A cached float64 0/1 tensor on ``device``: no host-to-device copy on the per-step path."""
    key = (device, tuple(flags))
    m = _MASKS.get(key)
    if m is None:
        if len(_MASKS) > 64:  # structures change rarely; keep the cache small
            _MASKS.clear()
        m = _MASKS[key] = torch.tensor(key[1], dtype=torch.float64, device=device)
    return m


def _local_stats(
    grads: Sequence[Tensor | None], p: float, foreach: bool | None
) -> GradStats:
    """compute_stats, counting a tensor object listed twice once in the global norm."""
    first = _first_occurrences(grads)
    if all(f or g is None for f, g in zip(first, grads)):
        return compute_stats(grads, p, foreach)
    unique = [g if f else None for g, f in zip(grads, first)]
    stats = compute_stats(unique, p, foreach)
    per = compute_stats(grads, p, foreach).per_tensor_norm
    return GradStats(stats.global_norm, per, stats.nonfinite, p)


def _check_replicated(replicated: bool | Sequence[bool], n: int) -> list[bool]:
    if isinstance(replicated, bool):
        return [replicated] * n
    flags = list(replicated)
    if len(flags) != n or not all(isinstance(f, bool) for f in flags):
        raise ValueError(
            f"`replicated` must be a bool or one bool per gradient ({n}), got {replicated!r:.80}. "
            "Pass True for DDP-style (identical on every rank) gradients, False for per-rank pieces."
        )
    return flags


@torch.no_grad()
def reduce_grad_stats(
    grads: Sequence[Tensor | None],
    norm_type: float = 2.0,
    group: object | None = None,
    extras: Tensor | None = None,
    *,
    replicated: bool | Sequence[bool] = True,
    foreach: bool | None = None,
) -> tuple[GradStats, Tensor | None]:
    """Global and per-tensor gradient norms identical on every rank, from one packed all-reduce.

    With one rank (or ``torch.distributed`` not initialised) this is exactly
    :func:`gradguard.stats.compute_stats` and ``extras`` come back unchanged.

    .. math::
        \\lVert g \\rVert_p = \\Big(\\sum_{\\text{ranks}} \\sum_{\\text{tensors}}
        m_{r,i} \\sum_{\\text{local}} |g|^p\\Big)^{1/p}, \\qquad m_{r,i} \\in \\{0, 1\\}
        \\text{ counts each replica once}

    Args:
        grads: the gradients (``None`` allowed), in the same order on every rank; plain tensors
            or DTensors (FSDP2, tensor parallelism).
        norm_type: order of the norm, > 0 or ``inf``.
        group: the process group to reduce over; ``None`` is the default group.
        extras: an optional 1-D (or 0-dim) tensor packed into the same all-reduce, e.g. the local
            loss; see "Extras" in the module docstring for how it is reduced.
        replicated (keyword-only): for plain (non-DTensor) gradients, whether each is the same on
            every rank (DDP: True, the default) or a distinct per-rank piece (False); a bool or one
            per gradient.
        foreach (keyword-only): use the foreach norm kernels; ``None`` picks them where supported.

    Returns:
        ``(stats, reduced_extras)``: :class:`~gradguard.stats.GradStats` whose ``global_norm`` and
        ``per_tensor_norm`` are the norms of the full (unsharded) gradients, in
        ``max(float32, grad dtype)``, and whose ``nonfinite`` is True on every rank when any rank
        holds a NaN or Inf; ``reduced_extras`` in float64 (``None`` when ``extras`` is None).

    Raises:
        ValueError: a DTensor on a mesh that does not span ``group``, a ``Partial`` gradient,
            ``norm_type=-inf`` with several ranks, or a malformed ``replicated``.

    Example:
        >>> import torch
        >>> from gradguard.distributed import reduce_grad_stats
        >>> stats, _ = reduce_grad_stats([torch.tensor([3.0, 4.0])])  # one process: local
        >>> float(stats.global_norm)
        5.0
    """
    p = float(norm_type)
    if not is_distributed(group):
        return _local_stats(grads, p, foreach), extras
    if p == -math.inf:
        raise ValueError(
            "`norm_type` -inf (the smallest absolute value) cannot be reduced across ranks "
            "together with the other statistics; use a norm > 0 or 'inf'."
        )
    dist = _dist()
    flags = _check_replicated(replicated, len(grads))
    group_rank, group_size = dist.get_rank(group), dist.get_world_size(group)
    local, counts = _local_and_mask(grads, flags, group_rank, group_size)

    present = [g for g in local if g is not None]
    if present:
        device = present[0].device
        out_dtype = max((acc_dtype(g.dtype) for g in present), key=lambda d: d.itemsize)
    elif extras is not None:
        device, out_dtype = extras.device, torch.float32
    else:
        device, out_dtype = torch.device("cpu"), torch.float32
    # float64 partials: |g|^p of a float32 norm cannot overflow before the norm itself does.
    f64 = torch.float64
    norms = tensor_norms(local, p, foreach)
    zero = torch.zeros((), dtype=f64, device=device)
    if norms and all(n is not None and n.device == device for n in norms):
        raw = torch.stack(norms).to(f64)  # type: ignore[arg-type]  # the common case: one stack
    else:
        raw = torch.stack([zero if n is None else n.to(device=device, dtype=f64) for n in norms]) \
            if norms else torch.zeros(0, dtype=f64, device=device)
    is_inf_norm = p == math.inf
    partial = raw if is_inf_norm or p == 1.0 else (raw.square() if p == 2.0 else raw.pow(p))
    nonfinite_local = (~torch.isfinite(partial)).sum(dtype=f64).reshape(1)
    # 0 * NaN = NaN: a bad value on a replica that does not count still reaches every rank.
    partial = partial * _mask(counts, device)
    if is_inf_norm:
        # MAX may drop NaN on some backends; +inf survives it and the count carries the flag.
        partial = torch.nan_to_num(partial, nan=math.inf)
    pieces = [partial, nonfinite_local]
    if extras is not None:
        pieces.append(extras.detach().reshape(-1).to(device=device, dtype=f64))
    buf = torch.cat(pieces)
    op = dist.ReduceOp.MAX if is_inf_norm else dist.ReduceOp.SUM
    dist.all_reduce(buf, op=op, group=group)  # the one collective of the step

    n = len(grads)
    red_partial, red_nonfinite = buf[:n], buf[n]
    reduced_extras = None
    if extras is not None:
        reduced_extras = buf[n + 1:].reshape(extras.shape)
    if is_inf_norm:
        per_tensor64 = red_partial
        total64 = red_partial.max() if n else zero
    else:
        root = (lambda x: x) if p == 1.0 else (torch.sqrt if p == 2.0 else (lambda x: x.pow(1.0 / p)))
        per_tensor64 = root(red_partial)
        first = _first_occurrences(grads)
        duplicated = any(g is not None and not f for g, f in zip(grads, first))
        total64 = root((red_partial * _mask(first, device)).sum() if duplicated else red_partial.sum())
    nonfinite = (red_nonfinite > 0) | ~torch.isfinite(total64)
    stats = GradStats(total64.to(out_dtype), per_tensor64.to(out_dtype), nonfinite, p)
    return stats, reduced_extras


def step_stats(
    grads: Sequence[Tensor | None],
    norm_type: float,
    loss: Tensor | None = None,
    group: object | None = None,
    foreach: bool | None = None,
    *,
    verify_loss: bool = False,
) -> tuple[GradStats, Tensor | None]:
    """What ``Guard.step`` needs each step: the statistics and the loss, identical on every rank.

    One process: :func:`gradguard.stats.compute_stats` and ``loss`` unchanged (bit for bit what a
    Guard computes without ``torch.distributed``). Several ranks: :func:`reduce_grad_stats` with
    the loss packed into the same all-reduce, with a 0/1 "this rank passed a loss" count beside
    it, so the buffer has the same size on every rank whether or not a rank passed a loss (a
    size mismatch would abort gloo or hang NCCL). The loss comes back as the mean over the ranks
    that passed one (the maximum under ``norm_type=inf``, whose all-reduce is a MAX); a rank
    that passed none gets None.

    ``verify_loss`` (keyword-only; the Guard sets it on its first step): read the count on the
    host (one sync) and raise ``ValueError`` on every rank alike when some ranks passed a loss
    and others did not, the usual mistake (``loss=loss if rank == 0 else None``).
    """
    if not is_distributed(group):
        return compute_stats(grads, norm_type, foreach), loss
    is_max = norm_type == math.inf
    present = [g for g in grads if g is not None]
    device = loss.device if loss is not None else (present[0].device if present else torch.device("cpu"))
    f64 = torch.float64
    if loss is None:
        value = torch.full((1,), -math.inf if is_max else 0.0, dtype=f64, device=device)
        given = torch.zeros(1, dtype=f64, device=device)
    else:
        value = loss.detach().reshape(1).to(f64)
        given = torch.ones(1, dtype=f64, device=device)
    # [value, given, -given]: under SUM, given sums to the count; under MAX, max(given) and
    # -max(-given) = min(given) tell "every rank" from "some ranks".
    extras = torch.cat([value, given, given.neg()])
    stats, reduced = reduce_grad_stats(grads, norm_type, group, extras, foreach=foreach)
    if reduced is None:  # pragma: no cover - reduce_grad_stats returns extras when distributed
        return stats, loss
    world = _dist().get_world_size(group)
    if verify_loss:
        # [sync] once per Guard (its first step): a wrong call site, caught on every rank alike.
        hi, neg_lo = reduced[1:3].tolist()
        count = hi if not is_max else (world if hi == 1 and -neg_lo == 1 else (0 if hi == 0 else -1))
        if count not in (0, world):
            raise ValueError(
                "`loss` was passed to Guard.step on some ranks and not on others; every rank "
                "must pass its loss (it is averaged across ranks in the step's all-reduce), or "
                "none. Pass loss=loss on every rank."
            )
    if loss is None:
        return stats, None
    value = reduced[0] if is_max else reduced[0] / reduced[1]
    out_dtype = loss.dtype if loss.dtype in (torch.float32, torch.float64) else torch.float32
    return stats, value.to(device=loss.device, dtype=out_dtype)


def has_dtensor(tensors: Sequence[Tensor | None]) -> bool:
    """True when any of ``tensors`` is a DTensor (FSDP2, tensor parallelism)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors)


@torch.no_grad()
def sharded_update_ratio(
    params: Sequence[Tensor], before: Sequence[Tensor], group: object | None = None
) -> Tensor:
    """Per-tensor ``||w - w_before|| / ||w||`` for DTensor parameters, from one all-reduce.

    The local norm of a shard is not the tensor's norm, so the two per-tensor norms are reduced
    across ranks together (:func:`reduce_grad_stats` on ``[w - w_before, ..., w, ...]``; a
    DTensor difference of equally placed tensors is a local operation). The Guard calls this on
    its update-measuring steps only (every ``measure_updates`` steps): one extra all-reduce there.
    NaN where the weight norm is 0 or a value is non-finite.
    """
    diffs = [a.detach() - b for a, b in zip(params, before)]
    stats, _ = reduce_grad_stats([*diffs, *(p.detach() for p in params)], 2.0, group)
    n = len(params)
    ratio = stats.per_tensor_norm[:n] / stats.per_tensor_norm[n:]
    return torch.where(torch.isfinite(ratio), ratio, math.nan)
