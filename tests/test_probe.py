"""Probe: saturation, dead units and scale per site, functional calls, temporal profile, cleanup."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradguard.doctor.probes import PINNED_DERIVATIVE, Probe, ProbeSummary, param_infos
from gradguard.testing import count_host_syncs

torch.set_num_threads(1)


def _site(summary: ProbeSummary, name: str):  # type: ignore[no-untyped-def]
    return next(s for s in summary.sites if s.name == name)


def test_saturation_matches_a_float64_reference() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Identity(), nn.Sigmoid(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 1))
    x = torch.randn(256, 10) * 4
    with Probe(net) as p:
        net(x)
        s = p.summary()
    z = x.double()
    sig = torch.sigmoid(z)
    ref = (sig * (1 - sig) < 0.25 * PINNED_DERIVATIVE).double().mean().item()
    assert _site(s, "1").saturated == pytest.approx(ref, abs=1e-6)
    assert _site(s, "1").rms == pytest.approx(sig.pow(2).mean().sqrt().item(), rel=1e-5)
    h = torch.tanh(net[2](torch.sigmoid(x))).double()
    assert _site(s, "3").saturated == pytest.approx((1 - h * h < PINNED_DERIVATIVE).double().mean().item(), abs=1e-6)
    assert math.isnan(_site(s, "1").dead)


def test_dead_units_counted_over_all_sampled_batches() -> None:
    lin = nn.Linear(4, 6)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.copy_(torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 0.0]))
        lin.weight[5, 0] = 1.0  # unit 5 follows x0: alive only when some x0 > 0
    net = nn.Sequential(lin, nn.ReLU())
    with Probe(net) as p:
        net(-torch.rand(8, 4))  # x0 < 0: unit 5 inactive in this batch
        assert _site(p.summary(), "1").dead == pytest.approx(4 / 6)
        net(torch.rand(8, 4))  # now unit 5 fires once
        s = p.summary()
    assert _site(s, "1").units == 6
    assert _site(s, "1").dead == pytest.approx(3 / 6)


def test_conv_units_are_channels() -> None:
    conv = nn.Conv2d(1, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([-1.0, 1.0, 1.0, 1.0]))
    net = nn.Sequential(conv, nn.ReLU())
    with Probe(net) as p:
        net(torch.randn(2, 1, 5, 5))
        s = p.summary()
    assert _site(s, "1").units == 4 and _site(s, "1").dead == pytest.approx(0.25)


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.b = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid(self.a(x))
        h = F.relu(h - 0.5)
        return self.b(h).tanh()


def test_functional_activations_are_attributed_to_the_running_module() -> None:
    net = nn.Sequential(nn.Linear(3, 3), Functional())
    with Probe(net) as p:
        net(torch.randn(7, 3))
        s = p.summary()
    names = [x.name for x in s.sites]
    assert names == ["0", "1.a", "1:sigmoid#0", "1:relu#1", "1.b", "1:tanh#2"]
    assert [x.kind for x in s.sites] == ["layer", "layer", "saturating", "relu", "layer", "saturating"]
    assert _site(s, "1:tanh#2").is_output
    assert not _site(s, "1:sigmoid#0").is_output
    assert s.module_order == ["0", "1.a", "1.b"]


def test_activation_module_is_not_counted_twice() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Sigmoid())
    with Probe(net) as p:
        net(torch.randn(3, 2))
        s = p.summary()
    assert [x.name for x in s.sites] == ["0", "1", "2"]


def test_no_host_sync_while_sampling_and_one_per_summary() -> None:
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    with Probe(net) as p:
        with count_host_syncs() as c:
            for _ in range(3):
                net(torch.randn(4, 8)).sum().backward()
        assert c.count == 0, c.ops
        with count_host_syncs() as c:
            p.summary()
        assert c.count == 2, c.ops  # the sampled values, and the parameter norms


def test_hooks_and_mode_removed_also_on_error() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Sigmoid())
    with pytest.raises(RuntimeError):
        with Probe(net):
            net(torch.randn(3, 5))  # wrong shape
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    from torch.overrides import _get_current_function_mode_stack

    assert not _get_current_function_mode_stack()
    # a later forward outside the probe is plain
    y = net(torch.randn(3, 2))
    assert y.shape == (3, 2)


def test_probe_does_not_change_outputs_or_grads() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(5, 4)
    net(x).sum().backward()
    ref = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    with Probe(net):
        out = net(x)
        out.sum().backward()
    assert torch.equal(out, net(x))
    assert all(torch.equal(a, p.grad) for a, p in zip(ref, net.parameters()))


def test_reset_starts_a_new_window_and_disable() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Sigmoid())
    with Probe(net) as p:
        net(torch.randn(3, 2))
        p.reset()
        assert p.summary().batches == 0
        p.enabled = False
        net(torch.randn(3, 2))
        assert p.summary().batches == 0
        p.enabled = True
        net(torch.randn(3, 2))
        assert p.summary().batches == 1 and _site(p.summary(), "1").calls == 1


class Seq(nn.Module):
    def __init__(self, cell: type[nn.RNNBase], scale: float) -> None:
        super().__init__()
        self.rnn = cell(2, 16, batch_first=True)
        self.fc = nn.Linear(16, 1)
        with torch.no_grad():
            self.rnn.weight_hh_l0.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("scale, grows", [(0.2, False), (8.0, True)])
def test_temporal_profile_of_a_recurrent_layer(scale: float, grows: bool) -> None:
    torch.manual_seed(2)
    net = Seq(nn.RNN, scale)
    x = torch.rand(4, 20, 2)
    with Probe(net) as p:
        net(x).sum().backward()
        s = p.summary()
    (t,) = s.temporal
    assert t.module == "rnn" and t.op == "RNN" and len(t.grad_norm) == 20
    # reference: the gradient of the loss w.r.t. each input time step
    xr = x.clone().requires_grad_(True)
    net(xr).sum().backward()
    ref = xr.grad.pow(2).sum(dim=(0, 2)).sqrt().tolist()
    assert t.grad_norm == pytest.approx(ref, rel=1e-4, abs=1e-12)
    assert (t.grad_norm[0] > t.grad_norm[-1]) == grows


def test_summary_round_trip_and_param_infos() -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    with Probe(net) as p:
        net(torch.randn(5, 2))
        s = p.summary()
    assert ProbeSummary.from_dict(s.to_dict()) == s
    infos = param_infos(net)
    assert [i.name for i in infos] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert infos[0].module == "0" and infos[0].module_type == "Linear" and infos[0].numel == 6
    assert infos[0].norm == pytest.approx(float(net[0].weight.detach().norm()))


def test_probe_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        Probe(lambda x: x)  # type: ignore[arg-type]
