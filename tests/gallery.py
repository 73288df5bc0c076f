"""A gallery of small sick and healthy networks for the doctor's tests.

Each :class:`Case` builds a model, a loss function, data and (optionally) an optimizer, and says
what the doctor should find: the finding code, which layers it must name (and must not), and a
remedy that must be among the top ones. Healthy cases expect no finding at all.

Everything is CPU-sized: a diagnose run on any case takes well under a second on one core.
The held-out evaluation (``benchmarks/doctor_eval.py``) builds its networks and data with the
functions here, but with other seeds, sizes and architectures than these cases.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Build = Callable[[], tuple[nn.Module, Callable[..., torch.Tensor], Any, torch.optim.Optimizer | None]]


@dataclass
class Case:
    name: str
    build: Build
    code: str | None  # None: healthy
    include: tuple[str, ...] = ()  # layers that must be named
    exclude: tuple[str, ...] = ()  # layers that must not be named
    remedy: tuple[str, ...] = ()  # at least one of these among the top 3 remedies
    steps: int = 30
    tags: tuple[str, ...] = field(default_factory=tuple)


# -- data --------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return x, torch.tensor(d.target)


def digit_batches(n: int, bs: int = 64, seed: int = 0, shape: str = "flat"
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of the 8x8 digits: ``shape`` "flat" (64 features), "image" (1x8x8) or "seq" (the 8
    rows as 8 channels of length 8, for Conv1d)."""
    x, y = digits()
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.randint(0, len(x), (bs,), generator=g)
        xb = x[idx]
        if shape == "image":
            xb = xb.view(-1, 1, 8, 8)
        elif shape == "seq":
            xb = xb.view(-1, 8, 8)
        out.append((xb, y[idx]))
    return out


def adding_batches(n: int, T: int, bs: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The adding problem: values U[0,1] and two markers; the target is the marked values' sum."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        v = torch.rand(bs, T, generator=g)
        m = torch.zeros(bs, T)
        a = torch.randint(0, T // 2, (bs,), generator=g)
        b = torch.randint(T // 2, T, (bs,), generator=g)
        m[torch.arange(bs), a] = 1
        m[torch.arange(bs), b] = 1
        out.append((torch.stack([v, m], -1), (v * m).sum(1, keepdim=True)))
    return out


def token_batches(n: int, vocab: int = 32, T: int = 16, bs: int = 16, seed: int = 0,
                  stride: int = 3, noise: float = 0.1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Next-token prediction on a noisy repeating pattern (token t+1 = token t + ``stride``,
    replaced by a random one with probability ``noise``)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, vocab, (bs, 1), generator=g)
        seq = (start + torch.arange(T + 1) * stride) % vocab
        noise_at = torch.rand(bs, T + 1, generator=g) < noise
        seq = torch.where(noise_at, torch.randint(0, vocab, (bs, T + 1), generator=g), seq)
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


# -- models ------------------------------------------------------------------------------------
def init_linear(m: nn.Module, how: str) -> None:
    """Initialise every Linear/Conv weight by ``how`` and zero the biases.

    ``how``: "old" (U[-1/sqrt(fan_in), 1/sqrt(fan_in)], the pre-2010 default), "he",
    "he_uniform", "xavier", "xavier_uniform", "xavier_tanh" (gain 5/3), "xavier_tanh_uniform",
    or "normal:<std>".
    """
    for mod in m.modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d, nn.Conv1d)):
            fan_in = mod.weight[0].numel()
            if how == "old":
                nn.init.uniform_(mod.weight, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
            elif how == "he":
                nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
            elif how == "he_uniform":
                nn.init.kaiming_uniform_(mod.weight, nonlinearity="relu")
            elif how == "xavier":
                nn.init.xavier_normal_(mod.weight)
            elif how == "xavier_uniform":
                nn.init.xavier_uniform_(mod.weight)
            elif how == "xavier_tanh":
                nn.init.xavier_normal_(mod.weight, gain=5 / 3)
            elif how == "xavier_tanh_uniform":
                nn.init.xavier_uniform_(mod.weight, gain=5 / 3)
            elif how.startswith("normal:"):
                nn.init.normal_(mod.weight, 0.0, float(how.split(":")[1]))
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)


def mlp(depth: int, width: int, act: Callable[[], nn.Module], init: str | None = None, *,
        d_in: int = 64, d_out: int = 10, norm: str | None = None, bias: bool = True) -> nn.Sequential:
    """``depth`` hidden Linear layers (each followed by ``norm``: None, "bn" or "ln", then ``act``)
    and an output Linear; ``init`` as in :func:`init_linear` (None: torch's default)."""
    layers: list[nn.Module] = []
    n = d_in
    for _ in range(depth):
        layers.append(nn.Linear(n, width, bias=bias))
        if norm == "bn":
            layers.append(nn.BatchNorm1d(width))
        elif norm == "ln":
            layers.append(nn.LayerNorm(width))
        layers.append(act())
        n = width
    layers.append(nn.Linear(n, d_out))
    net = nn.Sequential(*layers)
    if init is not None:
        init_linear(net, init)
    return net


class FunctionalSigmoidMLP(nn.Module):
    """Sigmoid called as a function inside ``forward`` (the probe must still see it)."""

    def __init__(self, depth: int, width: int) -> None:
        super().__init__()
        self.hidden = nn.ModuleList(nn.Linear(64 if i == 0 else width, width) for i in range(depth))
        self.out = nn.Linear(width, 10)
        init_linear(self, "old")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin in self.hidden:
            x = torch.sigmoid(lin(x))
        return self.out(x)


class ResidualMLP(nn.Module):
    """Pre-norm residual blocks ``h + Linear(act(Linear(LayerNorm(h))))``, hidden ``expand * width``."""

    def __init__(self, blocks: int, width: int, act: Callable[[], nn.Module] = nn.ReLU,
                 expand: int = 1) -> None:
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, expand * width), act(),
                          nn.Linear(expand * width, width)) for _ in range(blocks))
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


def cnn(depth: int, channels: int, act: Callable[[], nn.Module], init: str | None = None,
        norm: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = 1
    for _ in range(depth):
        layers.append(nn.Conv2d(c, channels, 3, padding=1))
        if norm:
            layers.append(nn.BatchNorm2d(channels))
        layers.append(act())
        c = channels
    layers += [nn.Flatten(), nn.Linear(channels * 64, 10)]
    net = nn.Sequential(*layers)
    if init is not None:
        init_linear(net, init)
    return net


class SeqModel(nn.Module):
    """A recurrent ``cell`` (``layers`` deep) and a Linear on its last time step; with
    ``recurrent_scale`` the recurrent weights are N(0, (scale / sqrt(hidden))^2)."""

    def __init__(self, cell: type[nn.RNNBase], hidden: int, d_in: int = 2,
                 recurrent_scale: float | None = None, layers: int = 1) -> None:
        super().__init__()
        self.rnn = cell(d_in, hidden, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(hidden, 1)
        if recurrent_scale is not None:
            with torch.no_grad():
                for name, p in self.rnn.named_parameters():
                    if name.startswith("weight_hh"):
                        p.normal_(0.0, recurrent_scale / math.sqrt(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 32, layers: int = 2, pre_norm: bool = True,
                 T: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(T, d))
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True,
                                           norm_first=pre_norm)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", torch.triu(torch.full((T, T), float("-inf")), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.pos[: x.shape[1]]
        h = self.enc(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)
        return self.head(self.norm(h))


def seq_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


# -- the cases ---------------------------------------------------------------------------------
def _mlp_case(depth: int, width: int, act: type[nn.Module], init: str, *, seed: int,
              opt: str | None = "sgd", lr: float = 0.1, steps: int = 30, norm: str | None = None,
              bias: bool = True) -> Build:
    def build() -> tuple[nn.Module, Any, Any, Any]:
        torch.manual_seed(seed)
        net = mlp(depth, width, act, init, norm=norm, bias=bias)
        o = None
        if opt == "sgd":
            o = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
        elif opt == "adam":
            o = torch.optim.Adam(net.parameters(), lr=lr)
        return net, F.cross_entropy, digit_batches(steps, seed=seed), o

    return build


def _seq_case(cell: type[nn.RNNBase], T: int, *, seed: int,
              opt: Callable[..., torch.optim.Optimizer], recurrent_scale: float | None = None) -> Build:
    """A 32-unit ``cell`` on the adding problem of length ``T``; ``opt(params)`` is its optimizer."""
    def build() -> tuple[nn.Module, Any, Any, Any]:
        torch.manual_seed(seed)
        net = SeqModel(cell, 32, recurrent_scale=recurrent_scale)
        return net, F.mse_loss, adding_batches(30, T=T, seed=seed), opt(net.parameters())

    return build


def _hidden(depth: int) -> tuple[str, ...]:
    """Names of the Linear layers in an mlp() Sequential without norms: 0, 2, 4, ..."""
    return tuple(str(2 * i) for i in range(depth + 1))


def cases() -> list[Case]:
    out: list[Case] = []
    # vanishing: deep sigmoid MLPs with the old init, several depths, widths and seeds
    for depth, width, seed in ((6, 64, 0), (10, 32, 1), (8, 128, 2)):
        names = _hidden(depth)
        out.append(Case(f"mlp_sigmoid_old_d{depth}_w{width}",
                        _mlp_case(depth, width, nn.Sigmoid, "old", seed=seed),
                        "vanishing_gradients", include=(names[0], names[1]), exclude=(names[-1],),
                        remedy=("relu_family",)))
    # the same with sigmoid called as a function in forward
    def fn_sigmoid() -> tuple[nn.Module, Any, Any, Any]:
        torch.manual_seed(3)
        net = FunctionalSigmoidMLP(8, 48)
        return net, F.cross_entropy, digit_batches(30, seed=3), torch.optim.SGD(net.parameters(), lr=0.1)
    out.append(Case("mlp_functional_sigmoid", fn_sigmoid, "vanishing_gradients",
                    include=("hidden.0",), exclude=("out",), remedy=("relu_family", "batch_norm",
                                                                      "xavier_init")))
    # deep ReLU with Xavier init (He et al. 2015): activations shrink by 1/sqrt(2) per layer
    for depth, seed in ((24, 4), (30, 5)):
        out.append(Case(f"mlp_relu_xavier_d{depth}", _mlp_case(depth, 48, nn.ReLU, "xavier", seed=seed),
                        "activation_scale_drift", include=(_hidden(depth)[-2],),
                        exclude=(_hidden(depth)[0],), remedy=("he_init",)))
    # tiny init in a tanh net: everything shrinks
    out.append(Case("mlp_tanh_small_init", _mlp_case(8, 64, nn.Tanh, "normal:0.02", seed=6),
                    "vanishing_gradients", include=("0",), exclude=("16",),
                    remedy=("xavier_init", "he_init")))
    # large init in a tanh net: saturation
    for depth, seed in ((4, 7), (6, 8)):
        out.append(Case(f"mlp_tanh_big_init_d{depth}", _mlp_case(depth, 64, nn.Tanh, "normal:1.0", seed=seed),
                        "saturated_activations", include=("1",), remedy=("xavier_init",)))
    # large init in a ReLU net: activations and gradients blow up
    out.append(Case("mlp_relu_big_init", _mlp_case(8, 64, nn.ReLU, "normal:0.5", seed=9, opt=None),
                    "exploding_gradients", include=("0",), remedy=("he_init",)))
    # dead ReLUs from a strongly negative bias
    def dead() -> tuple[nn.Module, Any, Any, Any]:
        torch.manual_seed(10)
        net = mlp(4, 64, nn.ReLU, "he")
        with torch.no_grad():
            net[2].bias.fill_(-6.0)
            net[4].bias.fill_(-6.0)
        return net, F.cross_entropy, digit_batches(30, seed=10), torch.optim.SGD(net.parameters(), lr=0.05)
    out.append(Case("mlp_dead_relu_bias", dead, "dead_units", include=("3", "5"), exclude=("1",),
                    remedy=("leaky_relu", "he_init")))
    # learning rate far too high
    out.append(Case("mlp_relu_lr_too_high", _mlp_case(3, 64, nn.ReLU, "he", seed=11, lr=3.0),
                    "learning_rate_too_high", remedy=("lower_learning_rate",)))
    out.append(Case("mlp_adam_lr_too_high", _mlp_case(3, 64, nn.ReLU, "he", seed=12, opt="adam", lr=0.3),
                    "learning_rate_too_high", remedy=("lower_learning_rate",)))
    # a learning rate so low nothing moves
    out.append(Case("mlp_stalled_tiny_lr", _mlp_case(3, 64, nn.ReLU, "he", seed=13, lr=1e-6),
                    "training_stalled", remedy=("adaptive_optimizer", "raise_learning_rate")))
    # deep sigmoid CNN: vanishing
    def sig_cnn() -> tuple[nn.Module, Any, Any, Any]:
        torch.manual_seed(14)
        net = cnn(6, 8, nn.Sigmoid, "old")
        return net, F.cross_entropy, digit_batches(30, seed=14, shape="image"), torch.optim.SGD(net.parameters(), lr=0.1)
    out.append(Case("cnn_sigmoid_old", sig_cnn, "vanishing_gradients", include=("0",),
                    exclude=("13",), remedy=("relu_family",)))
    # vanilla RNN, long sequences: gradient vanishes through time
    rnn_vanish = _seq_case(nn.RNN, 40, seed=15, opt=partial(torch.optim.SGD, lr=0.05))
    out.append(Case("rnn_vanishing_time", rnn_vanish, "vanishing_gradients", include=("rnn",),
                    exclude=("fc",), remedy=("gated_recurrence", "orthogonal_init")))
    # vanilla RNN with a large recurrent matrix: exploding through time
    rnn_explode = _seq_case(nn.RNN, 30, seed=16, opt=partial(torch.optim.SGD, lr=0.05),
                            recurrent_scale=2.5)
    out.append(Case("rnn_exploding_time", rnn_explode, "exploding_gradients", include=("rnn",),
                    remedy=("gradient_clipping", "orthogonal_init")))
    # a transformer without pre-norm and a huge learning rate: the loss goes non-finite or explodes
    def tf_hot() -> tuple[nn.Module, Any, Any, Any]:
        torch.manual_seed(17)
        net = TinyTransformer(pre_norm=True)
        return net, seq_ce, token_batches(30, seed=17), torch.optim.SGD(net.parameters(), lr=30.0)
    out.append(Case("transformer_lr_too_high", tf_hot, "learning_rate_too_high",
                    remedy=("lower_learning_rate",)))
    # NaN from the forward pass: log of a probability that underflows to 0
    def nan_loss() -> tuple[nn.Module, Any, Any, Any]:
        torch.manual_seed(18)
        net = mlp(2, 32, nn.ReLU, "normal:3.0")

        def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.nll_loss(torch.log(torch.softmax(out, -1)), y)
        return net, loss, digit_batches(10, seed=18), None
    out.append(Case("mlp_log_softmax_underflow", nan_loss, "nonfinite_loss",
                    remedy=("stable_loss",)))
    # a one-off outlier batch: a loss spike the run recovers from
    def spike() -> tuple[nn.Module, Any, Any, Any]:
        torch.manual_seed(19)
        net = mlp(3, 64, nn.ReLU, "he")
        data = digit_batches(40, seed=19)
        x, y = data[25]
        data[25] = (x * 30.0, y)
        return net, F.cross_entropy, data, torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)
    out.append(Case("mlp_outlier_batch_spike", spike, "loss_spike", steps=40,
                    remedy=("gradient_clipping", "spike_skipping")))

    # -- healthy ---------------------------------------------------------------------------------
    out.append(Case("healthy_mlp_relu_he", _mlp_case(8, 64, nn.ReLU, "he", seed=20, lr=0.02), None))
    out.append(Case("healthy_mlp_relu_he_adam", _mlp_case(12, 48, nn.ReLU, "he", seed=21, opt="adam", lr=1e-3), None))
    out.append(Case("healthy_mlp_relu_he_examine", _mlp_case(16, 64, nn.ReLU, "he", seed=22, opt=None), None))
    out.append(Case("healthy_mlp_tanh_xavier", _mlp_case(4, 64, nn.Tanh, "xavier_tanh", seed=23, lr=0.05), None))
    out.append(Case("healthy_mlp_bn_sigmoid", _mlp_case(6, 64, nn.Sigmoid, "xavier", seed=24, lr=0.1, norm="bn"), None))

    def resnet() -> tuple[nn.Module, Any, Any, Any]:
        torch.manual_seed(25)
        net = ResidualMLP(8, 64)
        return net, F.cross_entropy, digit_batches(30, seed=25), torch.optim.Adam(net.parameters(), lr=1e-3)
    out.append(Case("healthy_residual_layernorm", resnet, None))

    def good_cnn() -> tuple[nn.Module, Any, Any, Any]:
        torch.manual_seed(26)
        net = cnn(4, 8, nn.ReLU, "he", norm=True)
        return net, F.cross_entropy, digit_batches(30, seed=26, shape="image"), torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    out.append(Case("healthy_cnn_bn", good_cnn, None))

    out.append(Case("healthy_lstm", _seq_case(nn.LSTM, 30, seed=27, opt=partial(torch.optim.Adam, lr=1e-2)),
                    None))

    def transformer() -> tuple[nn.Module, Any, Any, Any]:
        torch.manual_seed(28)
        net = TinyTransformer(pre_norm=True, layers=3)
        return net, seq_ce, token_batches(30, seed=28), torch.optim.AdamW(net.parameters(), lr=3e-3)
    out.append(Case("healthy_transformer_prenorm", transformer, None))

    out.append(Case("healthy_short_rnn", _seq_case(nn.RNN, 6, seed=29, opt=partial(torch.optim.Adam, lr=3e-3)),
                    None))
    return out
