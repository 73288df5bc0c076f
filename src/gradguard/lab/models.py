"""Model families of the lab, with the activation and the initialisation spelled out.

Every factory takes the activation and the init by name, so an experiment's config reads like the
paper's set-up ("30 layers of 64 ReLU units, He init"). Initialisations:

=============== ===================================================================================
``"default"``   PyTorch's own (weights U[+-1/sqrt(fan_in)], Glorot & Bengio's "standard" init)
``"xavier"``    Glorot & Bengio (2010) "normalized": U[+-sqrt(6/(fan_in + fan_out))], zero bias
``"he"``        He et al. (2015): N(0, 2/fan_in) (negative slope folded in for leaky units), zero bias
``"normal"``    N(0, ``init_std``^2), zero bias (e.g. N(0, 1) or a too-small N(0, 0.01^2))
``"orthogonal"`` Saxe et al. (2014): a random (semi-)orthogonal matrix times ``init_gain``, zero bias
=============== ===================================================================================
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gradguard._checks import check_choice, check_int, check_positive, check_probability

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "MLP",
    "CharRNN",
    "ConvNet1d",
    "SequenceRegressor",
    "activation",
    "init_linear_",
]

ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "prelu", "identity")
INITS = ("default", "xavier", "he", "normal", "orthogonal")
_LEAKY_SLOPE = 0.01
_PRELU_INIT = 0.25


def activation(name: str) -> nn.Module:
    """A fresh activation module by name (one of :data:`ACTIVATIONS`)."""
    check_choice("activation", name, ACTIVATIONS)
    return {
        "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU,
        "leaky_relu": lambda: nn.LeakyReLU(_LEAKY_SLOPE), "elu": nn.ELU, "gelu": nn.GELU,
        "prelu": lambda: nn.PReLU(init=_PRELU_INIT), "identity": nn.Identity,
    }[name]()


def _negative_slope(act: str) -> float:
    return {"leaky_relu": _LEAKY_SLOPE, "prelu": _PRELU_INIT}.get(act, 0.0)


@torch.no_grad()
def init_linear_(
    layer: nn.Linear | nn.Conv1d, init: str, act: str = "relu", *, init_std: float = 1.0,
    init_gain: float = 1.0,
) -> None:
    """Initialise one Linear/Conv1d layer in place (see the module docstring for the schemes)."""
    check_choice("init", init, INITS)
    if init == "default":
        layer.reset_parameters()
        return
    w = layer.weight
    if init == "xavier":
        nn.init.xavier_uniform_(w, gain=init_gain)
    elif init == "he":
        nn.init.kaiming_normal_(w, a=_negative_slope(act), nonlinearity="leaky_relu")
        if init_gain != 1.0:
            w.mul_(init_gain)
    elif init == "normal":
        nn.init.normal_(w, 0.0, init_std)
    else:  # orthogonal
        nn.init.orthogonal_(w, gain=init_gain)
    if layer.bias is not None:
        layer.bias.zero_()


class MLP(nn.Module):
    """A fully-connected classifier with every choice explicit.

    ``depth`` counts the hidden layers. Each hidden layer is ``Linear -> [BatchNorm] -> act ->
    [Dropout]``. With ``residual=True`` the hidden layers after the first are grouped in pairs into
    He et al. (2016) blocks ``x + BN(W2 act(BN(W1 x)))`` followed by the activation (an odd
    leftover layer is a plain layer), so a residual and a plain net of the same ``depth`` have the
    same layers and differ only by the skip connections.

    Attributes:
        linears: the Linear layers in forward order (hidden layers, then the output layer).
        acts: the activation module applied after each hidden layer, in order (forward hooks on
            these record what each layer outputs).
    """

    def __init__(
        self, in_features: int, out_features: int, width: int = 64, depth: int = 4,
        activation_name: str = "relu", init: str = "default", *, batch_norm: bool = False,
        residual: bool = False, dropout: float = 0.0, bias: bool = True, init_std: float = 1.0,
        init_gain: float = 1.0,
    ) -> None:
        super().__init__()
        check_int("in_features", in_features)
        check_int("out_features", out_features)
        check_int("width", width)
        check_int("depth", depth, minimum=0)
        check_choice("activation_name", activation_name, ACTIVATIONS)
        check_probability("dropout", dropout, open_high=True)
        if residual and depth < 3:
            raise ValueError(
                f"`residual=True` needs `depth` >= 3 (a first layer and one 2-layer block), got {depth}."
            )
        self.residual = residual
        self.batch_norm = batch_norm
        dims = [in_features] + [width] * depth
        self.linears = nn.ModuleList(
            nn.Linear(dims[i], dims[i + 1], bias=bias) for i in range(depth)
        )
        self.linears.append(nn.Linear(dims[-1], out_features, bias=bias))
        self.norms = nn.ModuleList(nn.BatchNorm1d(width) for _ in range(depth)) if batch_norm else None
        self.acts = nn.ModuleList(activation(activation_name) for _ in range(depth))
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for layer in self.linears:
            init_linear_(layer, init, activation_name, init_std=init_std, init_gain=init_gain)

    def _pre(self, i: int, x: Tensor) -> Tensor:
        h = self.linears[i](x)
        return self.norms[i](h) if self.norms is not None else h

    def forward(self, x: Tensor) -> Tensor:
        depth = len(self.acts)
        i = 0
        if self.residual:
            x = self.drop(self.acts[0](self._pre(0, x)))
            i = 1
            while i + 1 < depth:
                h = self.acts[i](self._pre(i, x))
                x = self.drop(self.acts[i + 1](x + self._pre(i + 1, h)))
                i += 2
        while i < depth:
            x = self.drop(self.acts[i](self._pre(i, x)))
            i += 1
        return self.linears[-1](x)


class ConvNet1d(nn.Module):
    """A 1-D convolutional classifier for sequences such as MNIST-1D: ``depth`` conv layers of
    ``channels`` (kernel 5, stride 2 on every other layer), global average pooling, a linear head.
    """

    def __init__(
        self, length: int, out_features: int, channels: int = 32, depth: int = 3,
        activation_name: str = "relu", init: str = "he",
    ) -> None:
        super().__init__()
        check_int("length", length)
        check_int("depth", depth)
        layers: list[nn.Module] = []
        c_in = 1
        for i in range(depth):
            conv = nn.Conv1d(c_in, channels, kernel_size=5, stride=2 if i % 2 == 0 else 1, padding=2)
            init_linear_(conv, init, activation_name)
            layers += [conv, activation(activation_name)]
            c_in = channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x.unsqueeze(1)).mean(-1))


_CELLS = ("rnn", "lstm", "gru")


def _recurrent(cell: str, input_size: int, hidden: int) -> nn.Module:
    check_choice("cell", cell, _CELLS)
    if cell == "rnn":
        return nn.RNN(input_size, hidden, nonlinearity="tanh", batch_first=True)
    if cell == "lstm":
        return nn.LSTM(input_size, hidden, batch_first=True)
    return nn.GRU(input_size, hidden, batch_first=True)


@torch.no_grad()
def _scale_recurrent_(rnn: nn.Module, scale: float, generator: torch.Generator | None = None) -> None:
    """Set a vanilla RNN's recurrent matrix to ``scale`` x a random orthogonal matrix.

    Its spectral radius is then exactly ``scale``: above 1 the hidden state's Jacobian grows over
    time (exploding), below 1 it shrinks (vanishing); Pascanu et al. (2013), Section 2.1.
    """
    w = rnn.weight_hh_l0
    q, r = torch.linalg.qr(torch.randn(w.shape, generator=generator))
    w.copy_(scale * q * torch.sign(torch.diagonal(r))[None, :])


class CharRNN(nn.Module):
    """A character-level language model: embedding, one recurrent layer, a linear read-out."""

    def __init__(self, vocab_size: int, embed: int = 32, hidden: int = 128, cell: str = "rnn") -> None:
        super().__init__()
        check_int("vocab_size", vocab_size, minimum=2)
        self.embed = nn.Embedding(vocab_size, embed)
        self.rnn = _recurrent(cell, embed, hidden)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, ids: Tensor) -> Tensor:
        out, _ = self.rnn(self.embed(ids))
        return self.head(out)


class SequenceRegressor(nn.Module):
    """A recurrent net that reads a sequence and regresses one number from its last hidden state.

    Args:
        recurrent_scale: for ``cell="rnn"``, replace the recurrent matrix by this multiple of a
            random orthogonal matrix (its spectral radius); None keeps PyTorch's init.
    """

    def __init__(
        self, input_size: int = 2, hidden: int = 64, cell: str = "lstm",
        recurrent_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.rnn = _recurrent(cell, input_size, hidden)
        if recurrent_scale is not None:
            check_positive("recurrent_scale", recurrent_scale)
            if cell != "rnn":
                raise ValueError(
                    f"`recurrent_scale` applies to cell='rnn' only, got cell={cell!r}; pass None."
                )
            _scale_recurrent_(self.rnn, recurrent_scale)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1]).squeeze(-1)
