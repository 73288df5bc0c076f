"""Gradient accumulation: one ``guard.step`` per optimizer step, after the last micro-batch.

    python examples/accumulation.py --quick

The Guard must see the *accumulated* gradient: calling it per micro-batch would clip partial
sums (and a NaN in any micro-batch only shows in the sum). Divide each micro-batch loss by the
number of micro-batches, call ``backward()`` on each, then ``guard.step`` once. Pass the loss of
the whole window (the sum of the divided losses) so the history holds the step's loss. Under AMP,
``unscale_`` happens once too, inside ``guard.step``, after the last micro-batch.

The script checks that 4 micro-batches of 16 give the same gradient norm as one batch of 64.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradguard as gg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few seconds on a CPU")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    steps, micro = (10 if args.quick else 300), 4

    def make() -> tuple[nn.Module, torch.optim.Optimizer, gg.Guard]:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        o = torch.optim.SGD(m.parameters(), lr=0.1)
        return m, o, gg.Guard(m, clip=gg.FixedClip(0.5), flush_every=steps)

    data = [(torch.randn(64, 8), torch.randn(64, 1)) for _ in range(steps)]

    model, opt, guard = make()  # accumulate 4 micro-batches of 16
    for x, y in data:
        window_loss = 0.0
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            loss = nn.functional.mse_loss(model(xs), ys) / micro
            loss.backward()  # gradients add up in .grad
            window_loss = window_loss + loss.detach()
        guard.step(opt, loss=window_loss)  # once per optimizer step
        opt.zero_grad()
    guard.flush()

    ref_model, ref_opt, ref_guard = make()  # one batch of 64
    for x, y in data:
        loss = nn.functional.mse_loss(ref_model(x), y)
        loss.backward()
        ref_guard.step(ref_opt, loss=loss)
        ref_opt.zero_grad()
    ref_guard.flush()

    a, b = guard.history, ref_guard.history
    worst = max(abs(u - v) / v for u, v in zip(a.global_norm, b.global_norm))
    print(f"{steps} steps of {micro} micro-batches: global norms match one big batch to "
          f"{worst:.1e} (relative); loss {a.loss[0]:.4f} vs {b.loss[0]:.4f}; "
          f"{sum(a.clipped)} of {steps} steps clipped")
    assert worst < 1e-4
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
