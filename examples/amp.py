"""Mixed precision on a CPU: bf16 autocast, and fp16 autocast with ``torch.amp.GradScaler("cpu")``.

    python examples/amp.py --quick

With a GradScaler, pass it to the Guard: ``guard.step(optimizer, scaler=scaler, loss=loss)``.
The Guard calls ``scaler.unscale_`` once, measures and clips the *unscaled* gradients, skips the
step if they are non-finite (the scaler's own overflow check included), steps the optimizer and
calls ``scaler.update()``. Do not call ``scaler.step``/``scaler.update`` yourself. The loss you
pass is the unscaled one (``loss``, not ``scaler.scale(loss)``).

bf16 has float32's range and needs no scaler: ``guard.step(optimizer, loss=loss)``. Gradients of
bf16 parameters are accumulated in float32 for the norm, so it never overflows.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradguard as gg


def run(mode: str, steps: int) -> gg.History:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dtype = torch.float16 if mode == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cpu") if mode == "fp16" else None
    guard = gg.Guard(model, clip=gg.FixedClip(1.0), flush_every=10)
    w = torch.randn(32, 4)
    for _ in range(steps):
        x = torch.randn(64, 32)
        with torch.autocast("cpu", dtype=dtype):
            loss = nn.functional.cross_entropy(model(x), (x @ w).argmax(1))
        (scaler.scale(loss) if scaler is not None else loss).backward()
        guard.step(optimizer, scaler=scaler, loss=loss)
        optimizer.zero_grad()
    guard.flush()
    if scaler is not None:
        print(f"  loss scale after {steps} steps: {scaler.get_scale():.0f}")
    return guard.history


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few seconds on a CPU")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    steps = 30 if args.quick else 500
    for mode in ("bf16", "fp16"):
        print(f"{mode} autocast{' + GradScaler' if mode == 'fp16' else ''}:")
        h = run(mode, steps)
        # the recorded norms are unscaled: the same order of magnitude in both modes
        print(f"  loss {h.loss[0]:.3f} -> {h.loss[-1]:.3f}; first global norm {h.global_norm[0]:.3f} "
              f"(unscaled); {sum(h.clipped)} clipped, {sum(h.skipped)} skipped")
        assert h.global_norm[0] < 100, "a scaled norm would be ~65536x larger"
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
