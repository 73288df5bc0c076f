"""A character-level language model that explodes without protection and trains with a Guard.

A vanilla ReLU RNN (recurrent weights scaled so the spectral radius is above 1), trained with SGD
and momentum, is the textbook exploding-gradient set-up (Pascanu, Mikolov & Bengio, 2013): the
gradient through time grows geometrically, one bad batch throws the weights far away and the
loss turns NaN. The same model, seed and data with a Guard (ZClip clipping + skipping non-finite
steps) trains normally. The guarded run writes its per-step history as JSON lines:

    python examples/char_rnn.py --quick          # seconds; writes runs/char_rnn/guarded.jsonl
    gradguard report runs/char_rnn/guarded.jsonl  # diagnose the run from its history

Text: the Tiny Shakespeare excerpt shipped with gradguard's lab (``gradguard/lab/data``) if it is
installed, else ``--text FILE``, else the Python standard library's own sources.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from pathlib import Path

import torch
from torch import nn

import gradguard as gg


def load_text(path: str | None, limit: int) -> tuple[str, str]:
    """Up to ``limit`` characters of text and where they came from."""
    if path:
        return Path(path).read_text(encoding="utf-8", errors="replace")[:limit], path
    try:
        from importlib.resources import files

        shipped = files("gradguard") / "lab" / "data" / "tinyshakespeare.txt"
        if shipped.is_file():
            return shipped.read_text(encoding="utf-8")[:limit], "gradguard/lab/data/tinyshakespeare.txt"
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for f in sorted(stdlib.glob("*.py")):
        t = f.read_text(encoding="utf-8", errors="replace")
        parts.append(t)
        total += len(t)
        if total >= limit:
            break
    return "".join(parts)[:limit], f"Python standard library sources ({stdlib})"


class CharRNN(nn.Module):
    def __init__(self, vocab: int, hidden: int, radius: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.rnn = nn.RNN(hidden, hidden, batch_first=True, nonlinearity="relu")
        self.head = nn.Linear(hidden, vocab)
        nn.init.normal_(self.rnn.weight_hh_l0, std=radius / math.sqrt(hidden))  # radius > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(x))[0])


def batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ix = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        yield (torch.stack([data[i:i + seq] for i in ix]),
               torch.stack([data[i + 1:i + seq + 1] for i in ix]))


def train(data: torch.Tensor, vocab: int, cfg: argparse.Namespace, guard_path: Path | None) -> dict:
    torch.manual_seed(cfg.seed)
    model = CharRNN(vocab, cfg.hidden, cfg.radius)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    guard = None
    if guard_path is not None:
        guard = gg.Guard(model, clip=gg.ZClip(max_norm=1.0), sinks=[gg.JSONLSink(guard_path)],
                         flush_every=50)
    losses: list[float] = []
    for step, (x, y) in enumerate(batches(data, cfg.steps, cfg.batch, cfg.seq, cfg.seed)):
        loss = nn.functional.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1))
        loss.backward()
        if guard is not None:
            guard.step(opt, loss=loss)
        else:
            opt.step()
        opt.zero_grad()
        if step % 25 == 0 or step == cfg.steps - 1:
            losses.append(loss.item())  # an example may read the loss; the Guard never does
            if guard is None and not math.isfinite(losses[-1]):
                return {"exploded_at": step, "losses": losses}
    if guard is not None:
        guard.close()
        return {"losses": losses, "skipped": guard.total_skipped,
                "clipped": sum(guard.history.clipped)}
    return {"losses": losses}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few seconds on a CPU")
    ap.add_argument("--out", default="runs/char_rnn", help="where guarded.jsonl goes")
    ap.add_argument("--text", default=None, help="a text file to train on")
    ap.add_argument("--seed", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # small matrices: one thread is fastest, and CI machines are shared
    cfg = argparse.Namespace(seed=args.seed, radius=1.3, lr=0.5, seq=64,
                             hidden=64 if args.quick else 128, batch=16 if args.quick else 32,
                             steps=200 if args.quick else 3000)
    text, source = load_text(args.text, 200_000 if args.quick else 2_000_000)
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    print(f"text: {len(text):,} characters, {len(chars)} distinct, from {source}")

    t0 = time.perf_counter()
    plain = train(data, len(chars), cfg, None)
    if "exploded_at" in plain:
        print(f"without protection: the loss became non-finite at step {plain['exploded_at']}")
    else:
        print(f"without protection: final loss {plain['losses'][-1]:.3f} (did not explode with "
              "this seed; try another --seed)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = out / "guarded.jsonl"
    guarded = train(data, len(chars), cfg, run)
    print(f"with gg.Guard(clip=gg.ZClip(max_norm=1.0)): loss {guarded['losses'][0]:.3f} -> "
          f"{guarded['losses'][-1]:.3f}, {guarded['clipped']} steps clipped, "
          f"{guarded['skipped']} skipped ({time.perf_counter() - t0:.1f} s)")
    print(f"history: {run}\nnext:    gradguard report {run}")
    return 0 if all(math.isfinite(v) for v in guarded["losses"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
