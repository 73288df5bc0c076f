"""A character-level RNN language model trained with plain SGD and an optional clipping rule.

Shared by ``clipping_rnn`` and ``clipping_methods``. A clipping rule is any callable that takes the
parameter list after ``backward()`` and changes the gradients in place; whether it "clipped" is
measured, not reported by the rule: the step counts as clipped when the gradient norm after the
rule is below the norm before it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from gradguard.lab.datasets import CharCorpus
from gradguard.lab.models import CharRNN
from gradguard.stats import grad_stats

__all__ = ["CharRun", "train_char_rnn"]

ClipRule = Callable[[list[torch.nn.Parameter]], None]


@dataclass
class CharRun:
    """Per-step training loss, pre-clip gradient norm and clipped flag, and the held-out loss."""

    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    clipped: list[bool] = field(default_factory=list)
    val_loss: float = math.nan
    diverged_at: int | None = None

    @property
    def clipped_fraction(self) -> float:
        return sum(self.clipped) / len(self.clipped) if self.clipped else 0.0


@torch.no_grad()
def _held_out_loss(model: CharRNN, val: CharCorpus, bptt: int, batches: int, seed: int) -> float:
    g = torch.Generator().manual_seed(10_000 + seed)
    model.eval()
    total = 0.0
    for _ in range(batches):
        x, y = val.batch(32, bptt, g)
        total += F.cross_entropy(model(x).reshape(-1, val.vocab_size), y.reshape(-1)).item()
    model.train()
    return total / batches


def train_char_rnn(
    train: CharCorpus, val: CharCorpus, *, hidden: int, embed: int, bptt: int, batch_size: int,
    steps: int, lr: float, clip: ClipRule | None, seed: int, val_batches: int = 16,
) -> CharRun:
    """Train a tanh :class:`~gradguard.lab.models.CharRNN` with SGD for ``steps`` steps.

    A non-finite loss or gradient stops the run (``diverged_at``); the held-out loss is then NaN.
    """
    torch.manual_seed(seed)
    model = CharRNN(train.vocab_size, embed, hidden, "rnn")
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    run = CharRun()
    for step in range(steps):
        x, y = train.batch(batch_size, bptt, gen)
        loss = F.cross_entropy(model(x).reshape(-1, train.vocab_size), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        before: Tensor = grad_stats(params).global_norm
        value, norm = loss.item(), before.item()
        if not (math.isfinite(value) and math.isfinite(norm)):
            run.diverged_at = step
            return run
        clipped = False
        if clip is not None:
            clip(params)
            after = grad_stats(params).global_norm.item()
            clipped = after < norm * (1 - 1e-6)
        opt.step()
        run.loss.append(value)
        run.grad_norm.append(norm)
        run.clipped.append(clipped)
    run.val_loss = _held_out_loss(model, val, bptt, val_batches, seed)
    return run


def smooth(values: list[float], window: int) -> list[float]:
    """Running mean over ``window`` steps (for plots)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out
