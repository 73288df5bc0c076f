"""Small training loops and measurements shared by the experiments (no printing, no globals)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradguard.lab.datasets import Split
from gradguard.stats import grad_stats

__all__ = ["History", "evaluate", "grad_ratio", "layer_grad_norms", "minibatches", "train_classifier"]


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Index tensors of one shuffled epoch (the last, shorter batch is dropped if tiny)."""
    perm = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        idx = perm[start:start + batch_size]
        if len(idx) >= max(2, batch_size // 2):
            yield idx


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode; NaN loss if the model produced non-finite output."""
    was_training = model.training
    model.eval()
    logits = model(x)
    model.train(was_training)
    loss = F.cross_entropy(logits, y).item()
    acc = (logits.argmax(1) == y).float().mean().item()
    return loss, acc


def layer_grad_norms(layers: list[nn.Module]) -> list[float]:
    """The L2 norm of each layer's weight gradient (one pass through ``gradguard.grad_stats``)."""
    weights = [m.weight for m in layers]
    return grad_stats(weights).per_tensor_norm.tolist()


def grad_ratio(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """‖∇W₁‖ / ‖∇W_L‖ over the hidden layers of ``model.linears`` for one cross-entropy backward.

    The gradients are cleared before and after; NaN if the last hidden layer's gradient is zero.
    """
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    norms = layer_grad_norms(list(model.linears[:-1]))
    model.zero_grad(set_to_none=True)
    return norms[0] / norms[-1] if norms[-1] > 0 else math.nan


@dataclass
class History:
    """What :func:`train_classifier` records; lists are aligned with ``steps``."""

    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    diverged_at: int | None = None

    @property
    def final_train_loss(self) -> float:
        return self.train_loss[-1] if self.train_loss else math.nan


def train_classifier(
    model: nn.Module, data: Split, optimizer: torch.optim.Optimizer, *, steps: int,
    batch_size: int, generator: torch.Generator, eval_every: int,
    before_step: Callable[[int], None] | None = None,
    after_step: Callable[[int, float], None] | None = None,
    extra_loss: Callable[[], Tensor] | None = None,
    scheduler: Callable[[int], None] | None = None,
    eval_train: bool = True,
    stop: Callable[[History], bool] | None = None,
) -> History:
    """Minibatch training on ``data`` for ``steps`` steps with cross-entropy.

    Every ``eval_every`` steps (and at step 0 and at the end) records the full training loss
    (or the running minibatch mean when ``eval_train`` is False) and the test loss and accuracy.
    A non-finite minibatch loss stops training: ``diverged_at`` is set and the last recorded
    losses become NaN.

    Args:
        before_step: called with the step index after ``backward()`` and before
            ``optimizer.step()`` (clipping, gradient measurements).
        after_step: called with the step index and the minibatch loss after the update.
        extra_loss: a penalty added to the data loss (e.g. an L1 term).
        scheduler: called with the epoch index at the start of each epoch after the first.
        stop: called after each evaluation; training ends early when it returns True.
    """
    hist = History()
    n = len(data.y_train)
    step = 0
    epoch = 0
    running: list[float] = []

    def record() -> None:
        if eval_train or not running:
            tr, _ = evaluate(model, data.x_train, data.y_train)
        else:
            tr = sum(running) / len(running)
        te, acc = evaluate(model, data.x_test, data.y_test)
        hist.steps.append(step)
        hist.train_loss.append(tr)
        hist.test_loss.append(te)
        hist.test_acc.append(acc)
        running.clear()

    record()
    model.train()
    while step < steps:
        if epoch > 0 and scheduler is not None:
            scheduler(epoch)
        for idx in minibatches(n, batch_size, generator):
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            if extra_loss is not None:
                loss = loss + extra_loss()
            value = loss.item()
            if not math.isfinite(value):
                hist.diverged_at = step
                hist.steps.append(step)
                hist.train_loss.append(math.nan)
                hist.test_loss.append(math.nan)
                hist.test_acc.append(math.nan)
                return hist
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if before_step is not None:
                before_step(step)
            optimizer.step()
            if after_step is not None:
                after_step(step, value)
            running.append(value)
            step += 1
            if step % eval_every == 0 or step == steps:
                record()
                if stop is not None and stop(hist):
                    return hist
            if step >= steps:
                break
        epoch += 1
    return hist
