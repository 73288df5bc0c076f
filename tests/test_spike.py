"""Spike ladder: detector, skip, LR back-off on top of the scheduler, rollback, give-up, resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.guard import GuardError
from gradguard.testing import count_host_syncs

torch.set_num_threads(1)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))


def loss_at(model, i):
    g = torch.Generator().manual_seed(500 + i)
    x, y = torch.randn(5, 6, generator=g), torch.randn(5, 2, generator=g)
    return nn.functional.mse_loss(model(x), y)


def backward(model, i, spikes=()):
    loss = loss_at(model, i)
    loss.backward()
    if i in spikes:
        for p in model.parameters():
            p.grad.mul_(100.0)
    return loss


def policy(**kw):
    base = dict(signals=("grad_norm",), warmup=5, trigger=2, window=10)
    base.update(kw)
    return gg.SpikePolicy(**base)


# --------------------------------------------------------------------------------------------
def test_detector_ignores_nonfinite_and_blocked_steps():
    sp = gg.SpikePolicy(warmup=3)
    sp.bind(torch.device("cpu"))
    f = torch.tensor(False)
    for v in [1.0, 1.1, 0.9, 1.0, 1.05]:
        sp.detect(torch.tensor(v), torch.tensor(2.0 * v), f)
    before = sp.state
    with count_host_syncs() as c:
        flags = [sp.detect(torch.tensor(math.nan), torch.tensor(math.inf), f),
                 sp.detect(torch.tensor(50.0), torch.tensor(80.0), torch.tensor(True))]
    assert c.count == 0
    assert not any(bool(x) for x in flags)
    assert all(torch.equal(a, b) for a, b in zip(before, sp.state))
    assert bool(sp.detect(torch.tensor(50.0), torch.tensor(2.0), f))  # a norm spike
    assert bool(sp.detect(torch.tensor(1.0), torch.tensor(90.0), f))  # a loss spike
    assert not bool(sp.detect(torch.tensor(1.0), None, f))  # no loss given: norm only


def test_level_shift_is_absorbed_not_skipped_forever():
    sp = policy(z_thresh=3.0)
    sp.bind(torch.device("cpu"))
    f = torch.tensor(False)
    flags = [bool(sp.detect(torch.tensor(1.0 + 0.01 * (i % 3)), None, f)) for i in range(20)]
    flags += [bool(sp.detect(torch.tensor(3.0 + 0.01 * (i % 3)), None, f)) for i in range(200)]
    assert not any(flags[:20])
    assert flags[20] and not any(flags[-100:])


def test_spike_step_is_skipped_and_params_untouched():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, spike=policy(lr_factor=None))
    for i in range(12):
        backward(model, i, spikes=(9,))
        before = [p.detach().clone() for p in model.parameters()]
        out = guard.step(opt)
        opt.zero_grad()
        assert bool(out.skipped) == (i == 9)
        if i == 9:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert (guard.total_skipped, guard.total_nonfinite) == (1, 0)


def test_spike_skip_on_fused_optimizer_is_sync_free():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    guard = gg.Guard(model, spike=policy(lr_factor=None), flush_every=20, measure_updates=0)
    counts = []
    for i in range(20):
        backward(model, i, spikes=(9, 15))
        with count_host_syncs() as c:
            guard.step(opt)
        counts.append(c.count)
        opt.zero_grad()
    assert counts == [1] + [0] * 18 + [1]  # step 0: the fused state does not exist yet
    assert guard.total_skipped == 2 and guard.history.skipped[9] and guard.history.skipped[15]


# --------------------------------------------------------------------------------------------
def test_backoff_multiplies_scheduler_lr_and_restores_it_exactly():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.9 ** e)
    applied = 0
    guard = gg.Guard(model, spike=policy(lr_factor=0.5, backoff_steps=4), scheduler=sched)
    seen: list[float] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
    expected: list[float] = []
    scales = []
    for i in range(20):
        backward(model, i, spikes=(8, 9))
        scales.append(guard.lr_scale())
        out = guard.step(opt)
        opt.zero_grad()
        if not bool(out.skipped):
            expected.append(0.1 * 0.9 ** applied * scales[-1])
            applied += 1
        # the scheduler keeps owning the base LR: never overwritten, bit for bit
        assert opt.param_groups[0]["lr"] == sched.get_last_lr()[0] == 0.1 * 0.9 ** applied
    assert scales == [1.0] * 10 + [0.5] * 4 + [1.0] * 6  # escalation at step 9: 4 steps at x0.5
    assert seen == expected
    assert guard.flush().lr_scale[10:14] == [0.5] * 4


# --------------------------------------------------------------------------------------------
def run_with_rollback(bad, steps=20, max_rollbacks=3, opt_cls=torch.optim.Adam):
    calls = []
    offset = [0]

    def on_rollback(from_step, to_step):
        calls.append((from_step, to_step))
        offset[0] += from_step - to_step  # skip the batches that led to the spike

    model = mlp()
    opt = opt_cls(model.parameters(), lr=0.01)
    guard = gg.Guard(model, clip=gg.ZClip(warmup=3), spike=policy(
        lr_factor=None, rollback=True, snapshot_every=5, max_rollbacks=max_rollbacks,
        on_rollback=on_rollback))
    saved = {}
    while guard.step_count < steps:
        i = guard.step_count + offset[0]
        backward(model, i, spikes=bad)
        guard.step(opt)
        opt.zero_grad()
        saved.setdefault(guard.step_count, [p.detach().clone() for p in model.parameters()])
    return model, opt, guard, calls, saved


def test_rollback_restores_the_snapshot_and_calls_on_rollback():
    model, opt, guard, calls, saved = run_with_rollback(bad=(12, 13))
    assert calls == [(14, 10)]  # trouble began at step 12: the newest snapshot before it is 10
    assert guard.rollbacks == 1 and guard.step_count == 20
    # as if batches 10..13 never happened: bit-identical to a run on batches 0..9, 14..23
    ref = mlp()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    ref_guard = gg.Guard(ref, clip=gg.ZClip(warmup=3))
    for i in [*range(10), *range(14, 24)]:
        backward(ref, i)
        ref_guard.step(ref_opt)
        ref_opt.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    sa, sb = opt.state_dict()["state"], ref_opt.state_dict()["state"]
    assert all(torch.equal(sa[k][n], sb[k][n]) for k in sa for n in sa[k])
    assert all(torch.equal(a, b) for a, b in zip(guard.clip.state, ref_guard.clip.state))


def test_rollback_gives_up_after_max_attempts():
    with pytest.raises(GuardError, match=r"gave up after 2 rollback\(s\) \(max_rollbacks=2\)"):
        run_with_rollback(bad=set(range(12, 200)), max_rollbacks=2)


def test_backoff_then_rollback_ladder():
    """Escalation 1 backs off, escalation 2 of the same streak rolls back (and backs off again)."""
    calls = []
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, spike=policy(lr_factor=0.5, backoff_steps=6, rollback=True,
                                         rollback_after=2, snapshot_every=5,
                                         on_rollback=lambda a, b: calls.append((a, b))))
    actions = []
    for i in range(30):
        backward(model, i, spikes=(11, 12, 15, 16) if not calls else ())
        actions.append(guard.lr_scale())
        guard.step(opt)
        opt.zero_grad()
    assert actions[13] == 0.5  # backed off after the spikes at 11, 12
    assert calls == [(17, 10)]
    assert guard.lr_scale() == 1.0 and guard.rollbacks == 1


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ladder", ["backoff", "rollback"])
def test_kill_and_resume_with_spike_ladder(ladder):
    bad = (17, 18) if ladder == "backoff" else (27, 28)

    def fresh():
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, 7, gamma=0.5)
        sp = policy(lr_factor=0.5, backoff_steps=6, rollback=ladder == "rollback", rollback_after=1,
                    snapshot_every=10, on_rollback=lambda a, b: offs.__setitem__(0, offs[0] + a - b))
        return model, opt, sched, gg.Guard(model, clip=gg.AutoClip(window=16), spike=sp,
                                           scheduler=sched, flush_every=6)

    def train(model, opt, guard, stop):
        while guard.step_count < stop:
            backward(model, guard.step_count + offs[0], spikes=bad)
            guard.step(opt)
            opt.zero_grad()

    offs = [0]
    m1, o1, s1, g1 = fresh()
    train(m1, o1, g1, 40)
    offs = [0]
    m2, o2, s2, g2 = fresh()
    train(m2, o2, g2, 20)
    if ladder == "backoff":
        assert g2.lr_scale() == 0.5  # the checkpoint is taken in the middle of a back-off
    buf = io.BytesIO()
    torch.save({"m": m2.state_dict(), "o": o2.state_dict(), "s": s2.state_dict(), "g": g2.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m3, o3, s3, g3 = fresh()
    m3.load_state_dict(ck["m"])
    o3.load_state_dict(ck["o"])
    s3.load_state_dict(ck["s"])
    g3.load_state_dict(ck["g"])
    train(m3, o3, g3, 40)
    assert g1.rollbacks == g3.rollbacks == (1 if ladder == "rollback" else 0)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m3.parameters()))
    assert s1.get_last_lr() == s3.get_last_lr()


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,exc,match", [
    (dict(signals=("gradnorm",)), ValueError, "`signals` must name 'loss' and/or 'grad_norm'"),
    (dict(z_thresh=0), ValueError, "`z_thresh`"),
    (dict(alpha=1.5), ValueError, "`alpha` must lie in"),
    (dict(warmup=0), ValueError, "`warmup` must be >= 1"),
    (dict(min_rel_std=2.0), ValueError, "`min_rel_std`"),
    (dict(skip="yes"), TypeError, "`skip` must be a bool"),
    (dict(trigger=0), ValueError, "`trigger` must be >= 1"),
    (dict(window=1.5), TypeError, "`window` must be an int"),
    (dict(lr_factor=1.0), ValueError, "`lr_factor` must lie in"),
    (dict(backoff_steps=0), ValueError, "`backoff_steps`"),
    (dict(rollback=1), TypeError, "`rollback` must be a bool"),
    (dict(rollback_after=0), ValueError, "`rollback_after`"),
    (dict(snapshot_every=0), ValueError, "`snapshot_every`"),
    (dict(keep=0), ValueError, "`keep`"),
    (dict(max_rollbacks=-1), ValueError, "`max_rollbacks` must be >= 0"),
    (dict(on_rollback="skip"), TypeError, "`on_rollback` must be callable"),
])
def test_spike_policy_validation(kw, exc, match):
    with pytest.raises(exc, match=match):
        gg.SpikePolicy(**kw)
