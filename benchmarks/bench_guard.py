"""Benchmark a full training step with and without the Guard, from one run.

Models (CPU, float32, ``torch.set_num_threads(1)``):

* ``mlp12``: 12 Linear(512, 512) + Tanh layers and a head, batch 128 (3.2M parameters, 26 tensors);
* ``transformer``: 4 pre-norm ``nn.TransformerEncoderLayer`` blocks (d=128, 4 heads, FF 512) with
  an embedding and an LM head, batch 8 x 64 tokens (0.9M parameters, 54 tensors).

Variants, each a complete step (zero_grad, forward, backward, step) with ``AdamW`` (foreach):

* ``plain``: ``optimizer.step()``;
* ``plain + torch clip``: ``torch.nn.utils.clip_grad_norm_(params, 1.0)`` then ``step()``;
* ``guard monitor``: ``Guard(model)``: statistics, non-finite skipping and a per-layer history
  row every step, no clipping;
* ``guard full``: ``Guard(model, clip=ZClip())``: the same plus ZClip (and the per-layer
  update/weight ratio once per flush, the default);
* ``guard full fused``: the same with ``AdamW(fused=True)`` (the zero-sync path), against a plain
  fused step plus torch clipping.

The variants run round-robin, one step each, so a neighbour's load on a shared machine slows all
of them alike; the table shows the median step time, the ratio to ``plain + torch clip`` (the
target is <= 1.05 for ``guard full``) and host syncs per step counted with
``gradguard.testing.count_host_syncs`` (the non-fused AdamW itself reads its CPU step counter
once per parameter group: that count is shown in the plain rows). Before timing, one step of
``Guard(clip=FixedClip(1.0))`` is checked to give bit-identical parameters to torch's clip + step.

    python benchmarks/bench_guard.py            # full run (~1 minute on a 2-core CPU)
    python benchmarks/bench_guard.py --quick    # tiny sizes, a crash check for CI (seconds)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import gradguard as gg
from gradguard.testing import count_host_syncs


class MLP(nn.Sequential):
    def __init__(self, width: int, depth: int) -> None:
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.Tanh()]
        super().__init__(*layers, nn.Linear(width, 10))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, layers: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        block = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.emb(idx)))


@dataclass
class Case:
    name: str
    model: Callable[[], nn.Module]
    data: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cases(quick: bool) -> list[Case]:
    if quick:
        w, depth, b, vocab, d, t, n = 32, 12, 8, 50, 16, 8, 2
    else:
        w, depth, b, vocab, d, t, n = 512, 12, 128, 512, 128, 64, 4
    ce = nn.functional.cross_entropy
    return [
        Case("mlp12", lambda: MLP(w, depth), lambda: (torch.randn(b, w), torch.randint(0, 10, (b,))), ce),
        Case("transformer", lambda: TinyLM(vocab, d, 4, n),
             lambda: (torch.randint(0, vocab, (8, t)), torch.randint(0, vocab, (8, t))),
             lambda out, y: ce(out.flatten(0, 1), y.flatten())),
    ]


def make_variant(kind: str, base: nn.Module, case: Case) -> Callable[[tuple[torch.Tensor, torch.Tensor]], None]:
    model = copy.deepcopy(base)
    fused = kind.endswith("fused")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if fused else None)
    params = list(model.parameters())
    guard = None
    if kind.startswith("guard monitor"):
        guard = gg.Guard(model)
    elif kind.startswith("guard full"):
        guard = gg.Guard(model, clip=gg.ZClip())

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        opt.zero_grad()
        loss = case.loss(model(x), y)
        loss.backward()
        if guard is not None:
            guard.step(opt, loss=loss)
        else:
            if "clip" in kind:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

    return step


def check_parity(case: Case) -> None:
    """One step of Guard(FixedClip(1.0)) equals torch's clip_grad_norm_ + step, bit for bit."""
    torch.manual_seed(0)
    base = case.model()
    batch = case.data()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    oa, ob = torch.optim.AdamW(a.parameters(), lr=1e-2), torch.optim.AdamW(b.parameters(), lr=1e-2)
    guard = gg.Guard(b, clip=gg.FixedClip(1.0))
    for m in (a, b):
        (case.loss(m(batch[0]), batch[1]) * 100).backward()
    torch.nn.utils.clip_grad_norm_(a.parameters(), 1.0)
    oa.step()
    guard.step(ob)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        if not torch.equal(pa, pb):
            raise AssertionError(f"{case.name}: Guard(FixedClip) differs from torch at {n}")


VARIANTS = ["plain", "plain + torch clip", "guard monitor", "guard full",
            "plain + torch clip fused", "guard full fused"]


def run(quick: bool) -> list[tuple[str, str, float, float, float, float]]:
    torch.set_num_threads(1)
    warm, steps = (2, 4) if quick else (5, 80)
    rows = []
    for case in cases(quick):
        check_parity(case)
        torch.manual_seed(0)
        base = case.model()
        fns = {k: make_variant(k, base, case) for k in VARIANTS}
        batches = [case.data() for _ in range(8)]
        times: dict[str, list[float]] = {k: [] for k in VARIANTS}
        syncs: dict[str, float] = {}
        for i in range(warm + steps):
            for k in VARIANTS:
                t0 = time.perf_counter()
                fns[k](batches[i % len(batches)])
                dt = time.perf_counter() - t0
                if i >= warm:
                    times[k].append(dt)
        for k in VARIANTS:
            n = 3
            with count_host_syncs() as c:
                for i in range(n):
                    fns[k](batches[i])
            syncs[k] = c.count / n
        for k in VARIANTS:
            ref = "plain + torch clip fused" if k.endswith("fused") else "plain + torch clip"
            med = statistics.median(times[k])
            rows.append((case.name, k, med * 1e3, med / statistics.median(times[ref]), syncs[k],
                         syncs[k] - syncs[ref]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a few steps (CI)")
    args = ap.parse_args()
    rows = run(args.quick)
    table = Table(title="gradguard Guard: full training step, CPU, 1 thread (median)")
    for col in ("model", "variant", "step ms", "x plain+torch clip", "syncs/step", "added by Guard"):
        table.add_column(col, justify="left" if col in ("model", "variant") else "right")
    for name, k, ms, ratio, s, added in rows:
        table.add_row(name, k, f"{ms:.2f}", f"{ratio:.3f}", f"{s:g}", f"{added:g}")
    Console(width=110).print(table)
    print("syncs/step counts every host read, including AdamW(foreach)'s read of its CPU step "
          "counters (not a device sync on a GPU); 'added by Guard' is the difference to the "
          "plain + torch clip row of the same optimizer.")


if __name__ == "__main__":
    main()
