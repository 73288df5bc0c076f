"""Treatments: re-initialisation by activation, activation and recurrent swaps, batch norm."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradguard.doctor.remedies import (
    TREATMENTS,
    insert_batch_norm_,
    reinit_,
    swap_activations_,
    swap_recurrent_,
)

torch.set_num_threads(1)


def _std(w: torch.Tensor) -> float:
    return float(w.detach().std())


def test_reinit_auto_picks_the_init_by_following_activation() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.Tanh(),
                        nn.Linear(256, 256))
    changed = reinit_(net)
    assert changed == ["0", "2", "4"]
    assert _std(net[0].weight) == pytest.approx(math.sqrt(2 / 256), rel=0.05)  # He
    assert _std(net[2].weight) == pytest.approx(5 / 3 * math.sqrt(2 / 512), rel=0.05)  # Xavier, tanh gain
    assert _std(net[4].weight) == pytest.approx(math.sqrt(2 / 512), rel=0.05)  # output: gain 1
    assert all(float(m.bias.detach().abs().sum()) == 0 for m in net if isinstance(m, nn.Linear))


def test_reinit_uses_a_traced_map_and_explicit_schemes() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128))
    reinit_(net, follow={"0": "sigmoid", "1": None})
    assert _std(net[0].weight) == pytest.approx(math.sqrt(2 / 256), rel=0.07)
    reinit_(net, "he")
    assert _std(net[1].weight) == pytest.approx(math.sqrt(2 / 128), rel=0.07)
    reinit_(net, "orthogonal", follow={"0": "relu", "1": None})
    w = net[1].weight.detach()
    assert torch.allclose(w @ w.T, torch.eye(128), atol=1e-4)
    with pytest.raises(ValueError, match="`scheme` must be one of"):
        reinit_(net, "lecun")


def test_reinit_recurrent_layers() -> None:
    lstm = nn.LSTM(3, 8)
    reinit_(lstm)
    w = lstm.weight_hh_l0.detach()
    for k in range(4):
        blk = w[8 * k:8 * (k + 1)]
        assert torch.allclose(blk @ blk.T, torch.eye(8), atol=1e-5)
    b = lstm.bias_ih_l0.detach()
    assert torch.equal(b[8:16], torch.ones(8)) and float(b[:8].abs().sum()) == 0


def test_swap_activations_keeps_the_output_one_and_functional_calls() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Sigmoid(), nn.Linear(2, 2), nn.Tanh(),
                        nn.Linear(2, 1), nn.Sigmoid())
    swapped = swap_activations_(net, skip={"5"})
    assert swapped == ["1", "3"]
    assert isinstance(net[1], nn.ReLU) and isinstance(net[3], nn.ReLU)
    assert isinstance(net[5], nn.Sigmoid)
    assert swap_activations_(net, "leaky_relu", kinds=(nn.ReLU,)) == ["1", "3"]
    assert isinstance(net[1], nn.LeakyReLU)
    with pytest.raises(ValueError, match="`to` must be one of"):
        swap_activations_(net, "swish")

    class Fn(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(x)

    assert swap_activations_(Fn()) == []  # code, not a module: documented as not swappable


def test_insert_batch_norm_only_between_layer_and_activation() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Sigmoid(),
                        nn.Linear(8, 3))
    inner = net
    changed = insert_batch_norm_(net)
    assert changed == ["0", "2"]
    assert net is inner and len(net) == 7
    assert [type(m).__name__ for m in net] == ["Linear", "_FeatureBatchNorm", "Sigmoid", "Linear",
                                               "_FeatureBatchNorm", "Sigmoid", "Linear"]
    assert net(torch.randn(5, 4)).shape == (5, 3)
    assert net(torch.randn(2, 6, 4)).shape == (2, 6, 3)  # feature norm works on sequences too
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    assert insert_batch_norm_(conv) == ["0"] and isinstance(conv[1], nn.BatchNorm2d)
    assert insert_batch_norm_(nn.Linear(2, 2)) == []


def test_swap_recurrent_keeps_the_interface() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.RNN(3, 5, num_layers=2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, h = self.rnn(x)
            return out

    m = M()
    assert swap_recurrent_(m) == ["rnn"]
    assert isinstance(m.rnn, nn.GRU) and m.rnn.num_layers == 2 and m.rnn.batch_first
    assert m(torch.randn(2, 7, 3)).shape == (2, 7, 5)
    assert swap_recurrent_(m) == []


def test_treatment_table() -> None:
    auto = {k for k, t in TREATMENTS.items() if not t.manual}
    assert {"relu_family", "he_init", "xavier_init", "orthogonal_init", "batch_norm",
            "gated_recurrence", "leaky_relu", "gradient_clipping", "lower_learning_rate",
            "adaptive_optimizer", "lr_schedule", "skip_nonfinite_steps"} <= auto
    assert TREATMENTS["gradient_clipping"].needs_optimizer
    assert not TREATMENTS["he_init"].needs_optimizer
    assert TREATMENTS["residual_connections"].manual and TREATMENTS["stable_loss"].manual
    assert TREATMENTS["lower_learning_rate"].lr_factor == 0.1
