"""Benchmark the Guard from one run: its per-step fixed cost, its own work against torch's clip,
AGC against FixedClip at 1,000 tensors, a full training step, and the History's memory. Every
target is printed at the end as a ratio (or a count) measured in this run, with pass/miss.

CPU, ``torch.set_num_threads(1)``. Sections:

1. **aten ops per step** on a 2-tensor model (``nn.Linear(4, 1)``, SGD): every op dispatched by
   ``guard.step`` (``gradguard.testing.SyncCounter.dispatched``) minus those of the optimizer's
   own ``step()``, for torch's ``clip_grad_norm_`` and for a Guard with no clip, FixedClip,
   AutoClip, ZClip, AGC and the spike ladder (``SpikePolicy()``), plus host syncs per step. On a
   model with millisecond steps this fixed cost is what the Guard adds. Target: ZClip <= 60.
2. **the Guard's own work** on real gradients (``mlp12``: 12 Linear(512, 512) + Tanh and a head,
   batch 128, 26 tensors; ``transformer``: 4 pre-norm encoder blocks, d=128, 54 tensors):
   ``guard.step`` with an optimizer whose step is a no-op, against ``clip_grad_norm_`` on the
   same gradients, round-robin, median of the paired ratios.
3. **AGC at 1,000 tensors**: ``Guard(clip=AGC(exclude=()))`` against ``Guard(clip=FixedClip)``
   on 500 ``Linear(128, 128)`` (1,000 tensors, 8.3M parameters), no-op optimizer, paired.
   Target: <= 1.5. (AGC reads the weights too: in memory traffic it is 4/3 of a clip at best.)
4. **a full training step** (zero_grad, forward, backward, step; AdamW): ``plain + torch clip``
   against ``Guard(model)`` (monitor), ``Guard(clip=ZClip())`` and the same with
   ``AdamW(fused=True)`` (the zero-sync path), round-robin. Target: guard full <= 1.05.
5. **History memory**: 5,000 tensors x 2,000 rows (the default ``history_rows``), update ratios
   on one row in 50 (the default), measured with ``tracemalloc``. Target: <= 8 bytes per
   (row, tensor).

Before timing, one step of ``Guard(clip=FixedClip(1.0))`` is checked to give bit-identical
parameters to torch's clip + step.

    python benchmarks/bench_guard.py            # full run (~1 to 2 minutes on a 2-core CPU)
    python benchmarks/bench_guard.py --quick    # tiny sizes, a crash check for CI (seconds)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import gradguard as gg
from gradguard.history import History, HistoryBuffer
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


class _NoStep(torch.optim.SGD):
    """An optimizer whose step does nothing: isolates the Guard's own work."""

    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        return None


def paired(fns: dict[str, Callable[[], object]], reps: int, warm: int = 3) -> dict[str, list[float]]:
    """Round-robin timing: one call of each per round, so a neighbour's load hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(reps + warm):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= warm:
                times[k].append(time.perf_counter() - t0)
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of the paired ratio a/b (drift in load cancels)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


# -- 1. ops per step ------------------------------------------------------------------------------
OP_VARIANTS: dict[str, Callable[[], dict]] = {
    "Guard, no clip": lambda: {},
    "Guard + FixedClip": lambda: {"clip": gg.FixedClip(1.0)},
    "Guard + AutoClip": lambda: {"clip": gg.AutoClip()},
    "Guard + ZClip": lambda: {"clip": gg.ZClip()},
    "Guard + AGC": lambda: {"clip": gg.AGC(exclude=())},
    "Guard + spike ladder": lambda: {"spike": gg.SpikePolicy()},
}


def ops_per_step() -> list[tuple[str, int, int]]:
    """(variant, aten ops per step beyond the optimizer's own, host syncs per step)."""

    def setup() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        m = nn.Linear(4, 1)
        return m, torch.optim.SGD(m.parameters(), lr=0.01)

    def backward(m: nn.Module) -> torch.Tensor:
        loss = m(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        return loss

    m, opt = setup()
    backward(m)
    with count_host_syncs() as c:
        opt.step()
    opt_ops = c.dispatched
    rows = []
    with count_host_syncs() as c:
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    rows.append(("torch clip_grad_norm_", c.dispatched, c.count))
    for name, kw in OP_VARIANTS.items():
        m, opt = setup()
        guard = gg.Guard(m, measure_updates=0, flush_every=1000, **kw())
        for _ in range(30):  # past ZClip's and the detector's warm-up
            opt.zero_grad()
            guard.step(opt, loss=backward(m))
        opt.zero_grad()
        loss = backward(m)
        with count_host_syncs() as c:
            guard.step(opt, loss=loss)
        rows.append((name, c.dispatched - opt_ops, c.count))
    return rows


# -- 2. the Guard's own work ----------------------------------------------------------------------
def own_work(case: Case, base: nn.Module, reps: int) -> dict[str, float]:
    model = copy.deepcopy(base)
    x, y = case.data()
    case.loss(model(x), y).backward()
    params = list(model.parameters())
    noop = _NoStep(params, lr=0.0)
    g_mon = gg.Guard(model, measure_updates=0)
    g_full = gg.Guard(model, clip=gg.ZClip(z_thresh=1e9), measure_updates=0)  # never clips
    times = paired({"torch clip": lambda: torch.nn.utils.clip_grad_norm_(params, 1e9),
                    "guard monitor": lambda: g_mon.step(noop),
                    "guard full": lambda: g_full.step(noop)}, reps)
    return {"torch clip ms": statistics.median(times["torch clip"]) * 1e3,
            "guard monitor": ratio(times, "guard monitor", "torch clip"),
            "guard full": ratio(times, "guard full", "torch clip")}


# -- 3. AGC at 1,000 tensors ----------------------------------------------------------------------
def agc_vs_fixed(quick: bool, reps: int) -> dict[str, float]:
    width = 16 if quick else 128
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(500)])
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    params = list(model.parameters())
    noop = _NoStep(params, lr=0.0)
    g_fixed = gg.Guard(model, clip=gg.FixedClip(1e9), measure_updates=0)
    g_agc = gg.Guard(model, clip=gg.AGC(0.01, exclude=()), measure_updates=0)
    times = paired({"torch clip": lambda: torch.nn.utils.clip_grad_norm_(params, 1e9),
                    "fixed": lambda: g_fixed.step(noop),
                    "agc": lambda: g_agc.step(noop),
                    "agc free function": lambda: gg.adaptive_clip_grad_(params, 0.01)}, reps)
    return {"tensors": len(params), "params": sum(p.numel() for p in params),
            "fixed ms": statistics.median(times["fixed"]) * 1e3,
            "agc ms": statistics.median(times["agc"]) * 1e3,
            "agc / fixed": ratio(times, "agc", "fixed"),
            "agc / torch clip": ratio(times, "agc", "torch clip"),
            "free / torch clip": ratio(times, "agc free function", "torch clip")}


# -- 4. a full training step ----------------------------------------------------------------------
VARIANTS = ["plain", "plain + torch clip", "guard monitor", "guard full",
            "plain + torch clip fused", "guard full fused"]


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


def full_step(case: Case, steps: int) -> list[tuple[str, float, float, float]]:
    """(variant, median ms, ratio to plain + torch clip of the same optimizer, syncs/step)."""
    torch.manual_seed(0)
    base = case.model()
    fns = {k: make_variant(k, base, case) for k in VARIANTS}
    batches = [case.data() for _ in range(8)]
    it = iter(range(10**9))
    times = paired({k: (lambda f=f: f(batches[next(it) % len(batches)])) for k, f in fns.items()}, steps)
    rows = []
    for k in VARIANTS:
        with count_host_syncs() as c:
            for i in range(3):
                fns[k](batches[i])
        ref = "plain + torch clip fused" if k.endswith("fused") else "plain + torch clip"
        rows.append((k, statistics.median(times[k]) * 1e3, ratio(times, k, ref), c.count / 3))
    return rows


# -- 5. History memory ----------------------------------------------------------------------------
def history_bytes(n: int, rows: int, every: int = 50) -> float:
    """Bytes per (row, tensor) that a Guard's History holds after ``rows`` rows of ``n`` tensors."""
    names = [f"t{i}" for i in range(n)]
    buf = HistoryBuffer(names, capacity=every, ratio_capacity=2)
    norms = torch.rand(n)
    tracemalloc.start()
    hist = History(names)
    for chunk in range(rows // every):
        for r in range(every):
            buf.record(chunk * every + r, global_norm=norms[0], per_tensor_norm=norms,
                       update_ratio=norms if r == 0 else None)
        hist.extend(buf.flush(), max_rows=rows)
    used, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return used / (n * rows)


# -- report ---------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "[green]pass[/green]" if ok else "[red]miss[/red]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a few steps (CI)")
    args = ap.parse_args()
    quick = args.quick
    torch.set_num_threads(1)
    console = Console(width=130)
    t_start = time.perf_counter()
    targets: list[tuple[str, str, str, bool]] = []

    ops = ops_per_step()
    table = Table(title="1. aten ops per step, 2-tensor model (beyond the optimizer's own)", title_justify="left")
    for col in ("variant", "aten ops/step", "host syncs/step"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, n, s in ops:
        table.add_row(name, str(n), str(s))
    console.print(table)
    by_ops = {name: n for name, n, _ in ops}
    targets.append(("aten ops/step, Guard + ZClip", f"{by_ops['Guard + ZClip']}", "<= 60",
                    by_ops["Guard + ZClip"] <= 60))
    targets.append(("aten ops/step, Guard + spike ladder (recovery work)", f"{by_ops['Guard + spike ladder']}",
                    "<= 60", by_ops["Guard + spike ladder"] <= 60))

    table = Table(title="2. the Guard's own work (no-op optimizer) / torch clip_grad_norm_, same gradients",
                  title_justify="left")
    for col in ("model", "torch clip ms", "guard monitor", "guard full (ZClip)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for case in cases(quick):
        check_parity(case)
        torch.manual_seed(0)
        own = own_work(case, case.model(), 10 if quick else 60)
        table.add_row(case.name, f"{own['torch clip ms']:.2f}", f"{own['guard monitor']:.3f}",
                      f"{own['guard full']:.3f}")
    console.print(table)

    agc = agc_vs_fixed(quick, 5 if quick else 25)
    table = Table(title=f"3. AGC in the Guard, {agc['tensors']} tensors ({agc['params']:,} parameters), "
                        "no-op optimizer", title_justify="left")
    for col in ("FixedClip Guard ms", "AGC Guard ms", "AGC / FixedClip Guard", "AGC Guard / torch clip",
                "adaptive_clip_grad_ / torch clip"):
        table.add_column(col, justify="right")
    table.add_row(f"{agc['fixed ms']:.2f}", f"{agc['agc ms']:.2f}", f"{agc['agc / fixed']:.3f}",
                  f"{agc['agc / torch clip']:.3f}", f"{agc['free / torch clip']:.3f}")
    console.print(table)
    targets.append(("AGC Guard / FixedClip Guard, 1,000 tensors", f"{agc['agc / fixed']:.3f}", "<= 1.5",
                    agc["agc / fixed"] <= 1.5))

    table = Table(title="4. full training step, AdamW (median; ratio: paired, to plain + torch clip of the "
                        "same optimizer)", title_justify="left")
    for col in ("model", "variant", "step ms", "x plain+torch clip", "syncs/step"):
        table.add_column(col, justify="left" if col in ("model", "variant") else "right")
    for case in cases(quick):
        for k, ms, r, s in full_step(case, 4 if quick else 30):
            table.add_row(case.name, k, f"{ms:.2f}", f"{r:.3f}", f"{s:g}")
            if k == "guard full":
                targets.append((f"full step, guard full / plain + torch clip, {case.name}", f"{r:.3f}",
                                "<= 1.05", r <= 1.05))
            if k == "guard full fused":
                targets.append((f"host syncs/step, guard full fused, {case.name}", f"{s:g}", "== 0", s == 0))
    console.print(table)
    console.print("syncs/step counts every host read, including AdamW(foreach)'s read of its CPU step "
                  "counters (not a device sync on a GPU); the fused rows read nothing.")

    n_t, n_r = (500, 200) if quick else (5000, 2000)
    per = history_bytes(n_t, n_r)
    targets.append((f"History bytes per (row, tensor), {n_t:,} tensors x {n_r:,} rows", f"{per:.2f}", "<= 8",
                    per <= 8))

    table = Table(title="targets (issue 13), from this run", title_justify="left")
    for col in ("target", "measured", "goal", ""):
        table.add_column(col, justify="left" if col == "target" else "right")
    for name, got, goal, ok in targets:
        table.add_row(name, got, goal, verdict(ok))
    console.print(table)
    console.print(f"total {time.perf_counter() - t_start:.1f} s; torch {torch.__version__}, 1 thread, CPU"
                  + ("; --quick: tiny sizes, a crash check, its timings mean nothing" if quick else ""))


if __name__ == "__main__":
    main()
