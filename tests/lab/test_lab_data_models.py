"""The lab's offline data and its model families."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradguard.lab import datasets
from gradguard.lab.models import INITS, MLP, CharRNN, ConvNet1d, SequenceRegressor, init_linear_


def test_digits_is_standardised_and_stratified() -> None:
    d = datasets.digits()
    assert d.x_train.shape == (1257, 64) and d.x_test.shape == (540, 64) and d.n_classes == 10
    assert d.x_train.mean().abs() < 1e-5
    assert torch.bincount(d.y_train).min() >= 120  # every class present in proportion


def test_mnist1d_is_generated_offline_and_leaves_numpy_alone() -> None:
    np.random.seed(7)
    expected = np.random.rand()
    np.random.seed(7)
    d = datasets.mnist1d()
    assert np.random.rand() == expected  # make_dataset's global seeding was undone
    assert d.x_train.shape == (4000, 40) and d.x_test.shape == (1000, 40)


def test_adding_problem_targets_and_baseline() -> None:
    x, y = datasets.adding_problem(4000, 20, torch.Generator().manual_seed(0))
    assert x.shape == (4000, 20, 2) and y.shape == (4000,)
    assert torch.all(x[..., 1].sum(1) == 2)
    assert torch.allclose((x[..., 0] * x[..., 1]).sum(1), y)
    assert abs(((y - 1.0) ** 2).mean().item() - 1 / 6) < 0.01  # predict-the-mean MSE
    with pytest.raises(ValueError, match="length"):
        datasets.adding_problem(4, 1, torch.Generator())


def test_char_text_falls_back_to_the_stdlib(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    shipped = datasets.char_text(1000)
    assert "First Citizen" in shipped  # the Tiny Shakespeare slice is package data
    monkeypatch.setattr(datasets, "_DATA_DIR", tmp_path)
    text = datasets.char_text(5000)
    assert len(text) == 5000 and ("import" in text or "def " in text)
    with pytest.raises(FileNotFoundError, match="source='stdlib'"):
        datasets.char_text(1000, source="shakespeare")
    with pytest.raises(ValueError, match="source"):
        datasets.char_text(1000, source="web")


def test_char_corpus_batches_and_unigram_loss() -> None:
    corpus = datasets.char_corpus(20_000)
    train, val = corpus.split(0.1)
    assert len(train.ids) + len(val.ids) == len(corpus.ids)
    x, y = train.batch(4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert 0 < corpus.unigram_loss() < math.log(corpus.vocab_size)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_mlp_shapes(residual: bool, batch_norm: bool) -> None:
    m = MLP(64, 10, 32, 5, "relu", "he", residual=residual, batch_norm=batch_norm, dropout=0.1)
    assert m(torch.randn(8, 64)).shape == (8, 10)
    assert len(m.linears) == 6 and len(m.acts) == 5


def test_plain_and_residual_nets_share_their_layers() -> None:
    torch.manual_seed(0)
    plain = MLP(8, 3, 16, 5, "relu", "he")
    torch.manual_seed(0)
    res = MLP(8, 3, 16, 5, "relu", "he", residual=True)
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(plain.linears, res.linears))
    x = torch.randn(4, 8)
    assert not torch.allclose(plain(x), res(x))


@pytest.mark.parametrize(("init", "std"), [("he", math.sqrt(2 / 400)), ("xavier", math.sqrt(2 / 800)),
                                          ("normal", 0.01)])
def test_init_scales(init: str, std: float) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(400, 400)
    init_linear_(layer, init, "relu", init_std=0.01)
    assert abs(layer.weight.std().item() / std - 1) < 0.02
    assert torch.all(layer.bias == 0)


def test_orthogonal_init_and_recurrent_scale() -> None:
    layer = torch.nn.Linear(32, 32, bias=False)
    init_linear_(layer, "orthogonal")
    assert torch.allclose(layer.weight @ layer.weight.T, torch.eye(32), atol=1e-5)
    m = SequenceRegressor(2, 16, "rnn", recurrent_scale=2.0)
    assert torch.allclose(torch.linalg.svdvals(m.rnn.weight_hh_l0), torch.full((16,), 2.0), atol=1e-4)
    with pytest.raises(ValueError, match="cell='rnn'"):
        SequenceRegressor(2, 16, "lstm", recurrent_scale=2.0)
    assert set(INITS) >= {"default", "xavier", "he", "normal", "orthogonal"}


def test_model_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="activation_name"):
        MLP(4, 2, 8, 2, "swish")
    with pytest.raises(ValueError, match="residual"):
        MLP(4, 2, 8, 2, residual=True)
    with pytest.raises(ValueError, match="init"):
        MLP(4, 2, 8, 2, init="lecun")


def test_conv_and_recurrent_families() -> None:
    assert ConvNet1d(40, 10, channels=8, depth=3)(torch.randn(5, 40)).shape == (5, 10)
    for cell in ("rnn", "lstm", "gru"):
        assert CharRNN(30, 8, 16, cell)(torch.randint(0, 30, (2, 7))).shape == (2, 7, 30)
        assert SequenceRegressor(2, 8, cell)(torch.randn(3, 5, 2)).shape == (3,)
