"""Two processes, one decision: the Guard under DDP (or FSDP2) on a CPU with the gloo backend.

    python examples/ddp.py --quick            # DDP, 2 processes
    python examples/ddp.py --quick --fsdp     # FSDP2 (fully_shard): DTensor gradients

No ``torchrun`` needed: the script spawns its two workers itself. With ``torchrun`` the worker
body is the same (``init_process_group`` reads the environment).

Each rank trains on its own half of every batch. The Guard notices ``torch.distributed`` is
initialised and reduces its statistics with **one packed all-reduce per step**: the global and
per-layer norms (of the full, unsharded gradients under FSDP2), the non-finite flag and the mean
loss are identical on every rank, so every rank clips by the same factor and skips the same steps,
and the clipping policy's state stays identical. At one step a NaN is planted in rank 1's
gradients only: both ranks skip it. Rank 0 writes the history; the script checks that both ranks
end with identical parameters and Guard state.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradguard as gg


def digest(obj: object) -> str:
    h = hashlib.sha256()

    def walk(o: object) -> None:
        if isinstance(o, torch.Tensor):
            t = o.full_tensor() if hasattr(o, "full_tensor") else o
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                h.update(str(k).encode())
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            for x in o:
                walk(x)
        else:
            h.update(repr(o).encode())

    walk(obj)
    return h.hexdigest()[:16]


def worker(rank: int, world: int, init_file: str, steps: int, fsdp: bool, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped = model
    else:
        wrapped = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sinks = [gg.JSONLSink(Path(out) / "run.jsonl")] if rank == 0 else []  # one file, from rank 0
    guard = gg.Guard(model, clip=gg.ZClip(warmup=5), sinks=sinks, flush_every=10)

    g = torch.Generator().manual_seed(1234)  # the same global batches on every rank
    for step in range(steps):
        x = torch.randn(2 * 32, 16, generator=g)
        y = torch.sin(3 * x[:, :1])
        xs, ys = x[rank * 32:(rank + 1) * 32], y[rank * 32:(rank + 1) * 32]  # this rank's half
        loss = nn.functional.mse_loss(wrapped(xs), ys)
        loss.backward()
        if step == steps // 2 and rank == 1:  # a NaN on one rank only
            g0 = next(model.parameters()).grad
            (g0.to_local() if hasattr(g0, "to_local") else g0).view(-1)[0] = float("nan")
        guard.step(opt, loss=loss)  # one all-reduce inside: same decision on every rank
        opt.zero_grad()
    guard.close()

    h = guard.history
    mine = [digest(model.state_dict()), digest(guard.state_dict())]
    both: list[list[str] | None] = [None] * world
    dist.all_gather_object(both, mine)
    if rank == 0:
        kind = "FSDP2 (DTensor gradients)" if fsdp else "DDP"
        print(f"{kind}, {world} processes, {steps} steps: mean loss {h.loss[0]:.4f} -> {h.loss[-1]:.4f}; "
              f"{sum(h.clipped)} clipped; skipped at steps {[s for s, k in zip(h.step, h.skipped) if k]}")
        same = all(b == both[0] for b in both)
        print(f"parameters and Guard state identical on every rank: {same} {both[0]}")
        print(f"history (rank 0): {Path(out) / 'run.jsonl'}")
        if not same:
            raise SystemExit("ranks diverged")
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few seconds on a CPU")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP")
    ap.add_argument("--out", default="runs/ddp")
    args = ap.parse_args(argv)
    steps = 20 if args.quick else 400
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(2, os.path.join(tmp, "rdzv"), steps, args.fsdp, args.out), nprocs=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
