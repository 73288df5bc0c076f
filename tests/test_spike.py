"""Spike ladder: detector, skip, LR back-off on top of the scheduler, rollback, give-up, resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from pathlib import Path

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
    sp = gg.SpikePolicy(signals=("loss", "grad_norm"), warmup=3)
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


def test_level_shift_is_not_absorbed():
    """A level that jumps and stays up keeps spiking (ZClip-style absorption would hide it)."""
    sp = policy(z_thresh=3.0)
    sp.bind(torch.device("cpu"))
    f = torch.tensor(False)
    flags = [bool(sp.detect(torch.tensor(1.0 + 0.01 * (i % 3)), None, f)) for i in range(20)]
    flags += [bool(sp.detect(torch.tensor(2.0 + 0.01 * (i % 3)), None, f)) for i in range(200)]
    assert not any(flags[:20]) and all(flags[20:])
    sp.rearm()  # what the ladder does when it cannot roll back: learn the new level
    flags = [bool(sp.detect(torch.tensor(2.0 + 0.01 * (i % 3)), None, f)) for i in range(30)]
    assert not any(flags)


def test_detector_matches_float64_welford_then_ema():
    """Warm-up: the exact mean and population variance; after: var' = (1-w)(var + w d^2)."""
    gen = torch.Generator().manual_seed(3)
    xs = (1.0 + 0.1 * torch.randn(40, generator=gen, dtype=torch.float64)).tolist()
    sp = gg.SpikePolicy(signals=("grad_norm",), warmup=10, alpha=0.9, z_thresh=50.0)
    sp.bind(torch.device("cpu"), torch.float64)
    f = torch.tensor(False)
    for x in xs:
        sp.detect(torch.tensor(x, dtype=torch.float64), None, f)
    mean = sum(xs[:10]) / 10
    var = sum((x - mean) ** 2 for x in xs[:10]) / 10
    for x in xs[10:]:
        d = x - mean
        mean += 0.1 * d
        var = 0.9 * (var + 0.1 * d * d)
    assert sp.state[0, 1].item() == pytest.approx(mean, rel=1e-12)
    assert sp.state[1, 1].item() == pytest.approx(var, rel=1e-10)
    assert sp.state[2, 1].item() == 40


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
    """Escalation 1 backs off (and the detector learns anew), escalation 2 rolls back and backs
    off again, at the trouble level reached."""
    calls = []
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, spike=policy(lr_factor=0.5, backoff_steps=6, rollback=True,
                                         rollback_after=2, snapshot_every=5,
                                         on_rollback=lambda a, b: calls.append((a, b))))
    actions = []
    for i in range(30):
        backward(model, i, spikes=(11, 12, 20, 21) if not calls else ())
        actions.append(guard.lr_scale())
        guard.step(opt)
        opt.zero_grad()
    assert actions[13] == 0.5  # backed off after the spikes at 11, 12
    assert calls == [(22, 15)]  # newest snapshot before the update preceding the spike at 20
    assert actions[22] == 0.5 and guard.rollbacks == 1  # a repeated trouble: back-off again
    assert guard.step_count == 23 and guard.lr_scale() == 1.0


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
    (dict(signals=("gradnorm",)), ValueError, "`signals` must be 'auto' or name 'loss' and/or"),
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
    (dict(trigger=4, window=3), ValueError, r"`trigger` \(4\) spikes cannot fit in `window` \(3\)"),
    (dict(memory=0), ValueError, "`memory` must be >= 1"),
    (dict(restore_rng="no"), TypeError, "`restore_rng` must be a bool"),
    (dict(snapshot_to=3), TypeError, "`snapshot_to` must be 'cpu' or a directory"),
])
def test_spike_policy_validation(kw, exc, match):
    with pytest.raises(exc, match=match):
        gg.SpikePolicy(**kw)


# -- issue 11: a ladder that recovers real blow-ups ------------------------------------------
def _randint_loop(restore_rng, steps=40, burst=(25,)):
    """A loop that samples batch indices from the global RNG, as GPT scripts do, and owns its
    iteration counter; the returned log is (guard step, batch index) per call."""
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    state = {"iter": 0}

    def on_rollback(from_step, to_step):
        state["iter"] -= from_step - to_step  # the recipe: the counter follows the weights back

    guard = gg.Guard(model, spike=gg.SpikePolicy(
        signals=("grad_norm",), warmup=5, rollback=True, snapshot_every=10, restore_rng=restore_rng,
        max_rollbacks=10, on_rollback=on_rollback))
    log, tick = [], 0
    while state["iter"] < steps:
        i = int(torch.randint(1000, ()))
        log.append((guard.step_count, i))
        loss = loss_at(model, i)
        loss.backward()
        if tick in range(burst[0], burst[0] + 3):
            for p in model.parameters():
                p.grad.mul_(100.0)
        tick += 1
        state["iter"] += 1
        guard.step(opt, loss=None)
        opt.zero_grad()
    return guard, log, state


def test_rollback_does_not_replay_the_batches_by_default():
    guard, log, state = _randint_loop(restore_rng=False)
    assert guard.rollbacks == 1 and guard.step_count == state["iter"] == 40
    first = dict(log[:28])  # the batches seen before the rollback, by guard step
    again = [(s, i) for s, i in log[28:] if s in first]
    assert again and all(first[s] != i for s, i in again)  # fresh batches: no replay
    guard, log, _ = _randint_loop(restore_rng=True)  # the 0.1 behaviour, on request
    first = dict(log[:28])
    again = [(s, i) for s, i in log[28:] if s in first]
    assert again and all(first[s] == i for s, i in again)  # the very same batches


def test_heavy_tailed_healthy_data_never_rolls_back():
    """Occasional batches at ~10x the median loss (3%): skipped at most, never rolled back."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    guard = gg.Guard(model, clip=1.0, spike=gg.SpikePolicy(rollback=True), flush_every=25)
    w = torch.randn(6, 1)
    big = 0
    for t in range(600):
        x = torch.randn(32, 6)
        y = x @ w + 0.3 * torch.randn(32, 1)
        if torch.rand(()) < 0.03:  # a heavy-tailed batch
            y = y + 3.0 * torch.randn(32, 1)
            big += 1
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        guard.step(opt, loss=loss)
        opt.zero_grad()
    guard.flush()
    assert big >= 10 and guard.rollbacks == 0 and guard.spike.level == 0
    assert guard.total_skipped <= big
    assert not any(f.severity.value != "info" for f in guard.findings())


def test_rollbacks_are_remembered_and_back_off_grows():
    """Trouble that keeps coming back: each rollback goes to a snapshot not restored before
    while one exists, and the back-off after a repeated rollback grows (x0.5, then x0.25)."""
    calls, scales = [], []
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gg.Guard(model, spike=policy(trigger=3, window=3, rollback=True, snapshot_every=10,
                                         keep=3, max_rollbacks=5, backoff_steps=50,
                                         on_rollback=lambda a, b: calls.append((a, b))))
    tick = 0
    while guard.step_count < 60 and tick < 200:
        backward(model, tick, spikes=set(range(35, 38)) | set(range(41, 44)) | set(range(47, 50)))
        tick += 1
        guard.step(opt)
        scales.append(guard.lr_scale())
        opt.zero_grad()
    assert [b for _, b in calls] == [30, 20, 10]  # never the same point twice
    rec = guard._recovery
    assert guard.rollbacks == 3 and guard.spike.level == 3
    assert guard.spike.backoff_factor == 0.25 and 0.5 in scales and 0.25 in scales
    assert rec is not None and all(s.step <= 60 for s in rec.snapshots)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mid(self.emb(idx))))


@pytest.mark.parametrize("where", ["cpu", "disk"])
def test_snapshots_store_tied_weights_once_and_restore_the_tie(where, tmp_path):
    from gradguard.recovery import Recovery, snapshot_bytes

    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        nn.functional.cross_entropy(model(torch.randint(50, (8,))), torch.randint(50, (8,))).backward()
        opt.step()
        opt.zero_grad()
    sp = gg.SpikePolicy(rollback=True, snapshot_to="cpu" if where == "cpu" else tmp_path / "snaps")
    rec = Recovery(sp)
    rec.snapshot(7, model, opt, None, None, {"step": 7})
    data = rec.snapshots[0].load()
    n_params = sum(p.numel() for p in model.parameters())  # tied weight counted once
    steps = sum(v["step"].untyped_storage().nbytes() for v in data["optimizer"]["state"].values())
    assert snapshot_bytes(data) == 3 * 4 * n_params + steps  # weights, exp_avg, exp_avg_sq (fp32)
    if where == "disk":
        assert rec.snapshots[0].data is None and Path(rec.snapshots[0].path).exists()
    saved = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        model.emb.weight.add_(1.0)
        model.mid.weight.mul_(0)
    assert rec.restore(rec.snapshots[0], model, opt, None, None) == {"step": 7}
    assert model.head.weight is model.emb.weight  # still tied
    assert all(torch.equal(a, b) for a, b in zip(saved, model.parameters()))
    rec.clear()
    if where == "disk":
        assert not list((tmp_path / "snaps").iterdir())


def test_state_dict_round_trips_through_weights_only_and_refuses_other_settings():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gg.Guard(model, spike=policy(rollback=True, snapshot_every=5))
    for i in range(12):
        backward(model, i, spikes=(9,))
        guard.step(opt)
        opt.zero_grad()
    buf = io.BytesIO()
    torch.save(guard.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    g2 = gg.Guard(mlp(), spike=policy(rollback=True, snapshot_every=5))
    g2.load_state_dict(sd)
    assert torch.equal(g2.spike.state, guard.spike.state)
    assert g2.spike.ladder_state() == guard.spike.ladder_state()
    other = policy(rollback=True, snapshot_every=5, z_thresh=3.0)
    with pytest.raises(ValueError, match=r"z_thresh=6\.0 but this one has z_thresh=3\.0.*strict=False"):
        gg.Guard(mlp(), spike=other).load_state_dict(sd)
    other = policy(rollback=True, snapshot_every=5, z_thresh=3.0)
    other.bind(torch.device("cpu"))
    other.load_state_dict(sd["spike"], strict=False)  # the 0.1 behaviour: load anyway
    assert torch.equal(other.state, guard.spike.state)
    old = {"config": {}, "detector": {"mean": torch.zeros(2)}, "ladder": {"rollbacks": 2}}  # 0.1
    with pytest.raises(ValueError, match="saved by gradguard 0.1.*strict=False"):
        other.load_state_dict(old)
    other.load_state_dict(old, strict=False)
    assert other.rollbacks == 2


def test_history_carries_the_effective_lr(caplog):
    caplog.set_level("WARNING", logger="gradguard")  # another module may have raised it to ERROR
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, spike=policy(lr_factor=0.5, backoff_steps=4, trigger=2, window=2))
    for i in range(16):
        backward(model, i, spikes=(8, 9))
        guard.step(opt)
        opt.zero_grad()
    h = guard.flush()
    assert h.lr_scale[10:14] == [0.5] * 4
    assert h.lr[10:14] == pytest.approx([0.05] * 4) and h.lr[15] == pytest.approx(0.1)
    assert opt.param_groups[0]["lr"] == 0.1  # the loop's own LR is never overwritten
    assert "LR backed off (x0.5) on 4 of 16 steps" in caplog.text and "effective lr 0.05" in caplog.text


def test_per_step_ops_with_the_ladder_stay_small():
    """A Guard with the spike ladder on a 2-tensor model: at most 60 aten ops per step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not str(func).startswith("profiler."):
                Count.n += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, clip=1.0, spike=gg.SpikePolicy(rollback=True), flush_every=1000,
                     measure_updates=0)
    for i in range(30):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        if i == 29:
            with Count():
                guard.step(opt, loss=loss)
        else:
            guard.step(opt, loss=loss)
        opt.zero_grad()
    assert Count.n <= 60
