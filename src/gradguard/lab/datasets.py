"""Offline data for the lab: nothing here downloads.

* :func:`digits`: scikit-learn's bundled 8x8 digits (1797 x 64), standardised, stratified split.
* :func:`mnist1d`: Greydanus's MNIST-1D (2020), *generated* locally with
  ``make_dataset(get_dataset_args())`` (never ``download=True``).
* :func:`adding_problem`: Hochreiter & Schmidhuber (1997) adding task, in the modern form of
  Le et al. (2015) / Arjovsky et al. (2016): values U[0, 1], two markers, target = their sum.
* :func:`char_text` / :class:`CharCorpus`: character-level text, the Tiny Shakespeare slice shipped
  as package data, or the Python standard library's own sources when that file is absent.
"""

from __future__ import annotations

import functools
import logging
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from gradguard._checks import check_int, check_probability

__all__ = [
    "CharCorpus",
    "Split",
    "adding_problem",
    "char_corpus",
    "char_text",
    "digits",
    "mnist1d",
]

log = logging.getLogger(__name__)

_DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class Split:
    """A classification data set as float32 inputs and int64 labels, already on the CPU."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    n_classes: int

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    def subset(self, n_train: int, seed: int = 0) -> Split:
        """The first ``n_train`` training examples of a seeded permutation; the test set is kept."""
        n_train = check_int("n_train", n_train, minimum=1)
        if n_train > len(self.y_train):
            raise ValueError(
                f"`n_train` is {n_train} but the training set has only {len(self.y_train)} examples; "
                f"pass at most {len(self.y_train)}."
            )
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.y_train), generator=g)[:n_train]
        return Split(self.x_train[idx], self.y_train[idx], self.x_test, self.y_test, self.n_classes)


def _standardise(x_train: Tensor, x_test: Tensor) -> tuple[Tensor, Tensor]:
    mean = x_train.mean(0, keepdim=True)
    std = x_train.std(0, keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))  # constant pixels stay 0
    return (x_train - mean) / std, (x_test - mean) / std


@functools.lru_cache(maxsize=8)
def digits(test_fraction: float = 0.3, seed: int = 0) -> Split:
    """scikit-learn's bundled digits (1797 images of 8x8 = 64 features, 10 classes).

    Standardised with the training set's mean and std; a stratified split (scikit-learn's
    ``train_test_split``), so the class balance is the same on both sides.

    Args:
        test_fraction: fraction of examples held out, in (0, 1). Default 0.3 (1257 / 540).
        seed: seed of the split.
    """
    check_probability("test_fraction", test_fraction, open_low=True, open_high=True)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    xt, xe = _standardise(torch.tensor(x_tr, dtype=torch.float32), torch.tensor(x_te, dtype=torch.float32))
    return Split(xt, torch.tensor(y_tr), xe, torch.tensor(y_te), 10)


@functools.lru_cache(maxsize=4)
def mnist1d(num_samples: int = 5000, seed: int = 42) -> Split:
    """MNIST-1D (Greydanus, 2020, "Scaling down deep learning"), generated offline.

    Uses ``mnist1d.data.make_dataset(get_dataset_args())`` with the published defaults (5000
    samples, 80/20 split, sequence length 40): the same data as the published pickle, built
    locally. ``make_dataset`` seeds NumPy's global generator; its state is restored afterwards.

    Args:
        num_samples: number of examples to generate (the published set has 5000).
        seed: generator seed (the published set uses 42).
    """
    check_int("num_samples", num_samples, minimum=10)
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "gradguard.lab.datasets.mnist1d needs the `mnist1d` package: "
            'pip install "gradguard[report]"'
        ) from None
    import numpy as np

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    state = np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
    return Split(
        torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["y"], dtype=torch.int64),
        torch.tensor(d["x_test"], dtype=torch.float32), torch.tensor(d["y_test"], dtype=torch.int64),
        10,
    )


def adding_problem(n: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The adding problem: inputs ``(n, length, 2)``, targets ``(n,)``.

    Channel 0 holds values drawn from U[0, 1]; channel 1 marks two positions, one in each half of
    the sequence. The target is the sum of the two marked values. Predicting the mean (1.0) gives
    an MSE of Var(U1 + U2) = 1/6, the baseline a model must beat.

    References:
        Hochreiter & Schmidhuber (1997), "Long Short-Term Memory", Experiment 4; Le, Jaitly &
        Hinton (2015), "A Simple Way to Initialize Recurrent Networks of Rectified Linear Units".
    """
    check_int("n", n, minimum=1)
    check_int("length", length, minimum=2, fix="The two markers need at least two time steps.")
    values = torch.rand(n, length, generator=generator)
    half = length // 2
    first = torch.randint(0, half, (n,), generator=generator)
    second = torch.randint(half, length, (n,), generator=generator)
    markers = torch.zeros(n, length)
    rows = torch.arange(n)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    x = torch.stack([values, markers], dim=-1)
    y = values[rows, first] + values[rows, second]
    return x, y


def _stdlib_text(max_chars: int) -> str:
    """Concatenated sources of the standard library's top-level modules, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


def char_text(max_chars: int = 200_000, source: str = "auto") -> str:
    """Character-level training text, offline.

    Args:
        max_chars: how many characters to return at most.
        source: ``"shakespeare"`` (the Tiny Shakespeare slice shipped in ``gradguard/lab/data``,
            the first ~200 kB of karpathy/char-rnn's corpus), ``"stdlib"`` (this Python's own
            standard-library sources) or ``"auto"`` (Shakespeare if shipped, else stdlib).
    """
    check_int("max_chars", max_chars, minimum=100)
    if source not in ("auto", "shakespeare", "stdlib"):
        raise ValueError(
            f"`source` must be 'auto', 'shakespeare' or 'stdlib', got {source!r}."
        )
    path = _DATA_DIR / "tinyshakespeare.txt"
    if source in ("auto", "shakespeare"):
        if path.is_file():
            return path.read_text(encoding="utf-8")[:max_chars]
        if source == "shakespeare":
            raise FileNotFoundError(
                f"the Tiny Shakespeare slice is not installed at {path}; pass source='stdlib' "
                "(or 'auto') to use the standard library's sources instead."
            )
        log.info("no Tiny Shakespeare slice at %s; using the stdlib sources as text", path)
    return _stdlib_text(max_chars)


@dataclass(frozen=True)
class CharCorpus:
    """A text encoded as character ids, with a sampler of (input, next-character) windows."""

    ids: Tensor
    vocab: tuple[str, ...]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def split(self, val_fraction: float = 0.1) -> tuple[CharCorpus, CharCorpus]:
        """The text cut in two: the first ``1 - val_fraction`` for training, the rest held out."""
        check_probability("val_fraction", val_fraction, open_low=True, open_high=True)
        cut = int(len(self.ids) * (1 - val_fraction))
        return CharCorpus(self.ids[:cut], self.vocab), CharCorpus(self.ids[cut:], self.vocab)

    def unigram_loss(self) -> float:
        """Cross-entropy (nats) of predicting each character by its frequency: the loss a model
        reaches by learning character counts only, with no context."""
        counts = torch.bincount(self.ids, minlength=self.vocab_size).double()
        p = counts[counts > 0] / counts.sum()
        return float(-(p * p.log()).sum())

    def batch(self, batch_size: int, bptt: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``batch_size`` random windows of ``bptt`` characters and the characters that follow."""
        starts = torch.randint(0, len(self.ids) - bptt - 1, (batch_size,), generator=generator)
        offs = starts[:, None] + torch.arange(bptt + 1)[None, :]
        chunk = self.ids[offs]
        return chunk[:, :-1], chunk[:, 1:]


@functools.lru_cache(maxsize=4)
def char_corpus(max_chars: int = 200_000, source: str = "auto") -> CharCorpus:
    """:func:`char_text` encoded with a sorted character vocabulary."""
    text = char_text(max_chars, source)
    vocab = tuple(sorted(set(text)))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
    return CharCorpus(ids, vocab)
