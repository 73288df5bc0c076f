"""The recorded-run report: incidents told from the Guard's own columns, level shifts, advice that
accounts for what the run did, "too few steps", and the streaming JSONL reader."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import gradguard as gg
from gradguard import messages as M
from gradguard.cli import main
from gradguard.history import History
from gradguard.recorded import MIN_STEPS, findings, incidents, read_jsonl, verdict

torch.set_num_threads(1)


def history(loss, *, steps=None, skipped=(), nonfinite=(), clipped=None, threshold=math.inf,
            lr_scale=None, lr=None, names=("a.weight", "b.weight")) -> History:
    """A history as a Guard records it: a gently falling loss unless told otherwise."""
    n = len(loss)
    h = History(list(names))
    h.step = list(steps) if steps is not None else list(range(n))
    h.loss = [float(v) for v in loss]
    h.global_norm = [math.nan if i in nonfinite else 1.0 + 0.05 * math.sin(i) for i in range(n)]
    h.threshold = [threshold] * n
    h.clipped = list(clipped) if clipped is not None else [False] * n
    h.skipped = [i in skipped or i in nonfinite for i in range(n)]
    h.lr_scale = list(lr_scale) if lr_scale is not None else [1.0] * n
    h.lr = list(lr) if lr is not None else [1e-3] * n
    h.layer_norm = [[math.nan if i in nonfinite else 0.7, 0.7] for i in range(n)]
    h.update_ratio = [[math.nan, math.nan] for _ in range(n)]
    return h


def falling(n, start=3.0, end=2.0, wiggle=0.02):
    return [start + (end - start) * i / (n - 1) + wiggle * math.sin(1.7 * i) for i in range(n)]


# --------------------------------------------------------------------------------------------
def test_quiet_on_a_healthy_record():
    assert findings(history(falling(200))) == []
    assert verdict(history(falling(200))) == "nothing to report"


def test_heavy_tailed_outliers_are_not_a_level_shift():
    loss = falling(300)
    for i in range(20, 300, 37):
        loss[i] *= 10  # an occasional batch at 10x, never skipped
    assert findings(history(loss)) == []  # the data's tail: nothing happened


def test_level_shift_is_its_own_finding_and_an_error(tmp_path: Path, capsys):
    loss = falling(100) + [4.5 + 0.02 * math.sin(i) for i in range(60)]  # doubles, stays up
    h = history(loss)
    fs = findings(h)
    codes = [f.code for f in fs]
    shift = next(f for f in fs if f.code == "level_shift")
    assert shift.severity.value == "error" and shift.evidence["start_step"] == 100
    assert shift.evidence["factor"] > 2
    inc = next(f for f in fs if f.code == "incident")
    assert inc.evidence["start_step"] == 100 and not inc.evidence["recovered"]
    assert "not recovered" in M.finding_text(inc, "en") and "회복되지 않음" in M.finding_text(inc, "ko")
    assert "gradient_clipping" in shift.remedies  # this run never clipped
    assert codes[0] in ("level_shift", "incident")
    path = tmp_path / "run.jsonl"
    h.to_jsonl(path)
    assert main(["report", str(path)]) == 1
    out = capsys.readouterr().out
    assert "Level shift" in out and "steps 100–159:" in out


def test_story_of_a_handled_spike():
    """Loss x3 at step 60, two steps skipped, a rollback to step 40, LR x0.5 for 30 steps."""
    n = 140
    loss = falling(n)
    steps = list(range(64)) + list(range(40, 40 + n - 64))
    loss[60:64] = [loss[60] * 3] * 4
    lr_scale = [1.0] * 64 + [0.5] * 30 + [1.0] * (n - 94)
    h = history(loss, steps=steps, skipped={61, 62}, lr_scale=lr_scale)
    [inc] = incidents(h)
    assert (inc.start_step, inc.skipped, inc.rollbacks, inc.rolled_back_to) == (60, 2, 1, [40])
    assert inc.backoff == 0.5 and inc.backoff_steps == 30
    assert inc.loss_factor == pytest.approx(3, rel=0.05) and inc.recovered
    f = next(f for f in findings(h) if f.code == "incident")
    assert f.severity.value == "info" and f.remedies == []
    en = M.finding_text(f, "en")
    assert en.startswith("steps 60–63: loss ×") and "2 step(s) skipped" in en
    assert "LR ×0.5 for 30 steps" in en and "rolled back 1× (to step 40)" in en
    assert "back to the pre-spike level by step" in en
    ko = M.finding_text(f, "ko")
    assert "2스텝 건너뜀" in ko and "롤백" in ko and "회복" in ko


def test_lr_burst_from_the_loop_is_named_with_its_step():
    n = 200
    lr = [1e-3 * (i + 1) / 20 for i in range(20)] + [1e-3 * (1 - 0.5 * i / 180) for i in range(180)]
    for i in range(120, 125):
        lr[i] *= 10
    [inc] = incidents(history(falling(n), lr=lr))
    assert inc.start_step == 120 and inc.end_step == 124 and inc.lr_jump == pytest.approx(10, rel=0.02)
    assert verdict(history(falling(n), lr=lr)).startswith("steps 120–124: LR raised ×")
    creep = [v * (1.05 ** max(0, i - 100)) for i, v in enumerate(lr)]  # x1.05 a step from 100
    creep[120:125] = [v / 10 * 1.05 ** (i - 100) for i, v in zip(range(120, 125), lr[120:125])]
    [inc] = incidents(history(falling(n), lr=creep))
    assert inc.start_step == 101 and inc.lr_jump > 50  # named from where the creep began
    assert inc.recovered and verdict(history(falling(n), lr=creep)).endswith("the loss was not affected")


# --------------------------------------------------------------------------------------------
def test_advice_accounts_for_what_the_run_did():
    """Clipped on every step at 0.25: the step size is the problem. Non-finite steps that were
    skipped: no 'skip non-finite steps' remedy and no non-finite error."""
    n = 60
    loss = falling(n)
    h = history(loss, clipped=[True] * n, threshold=0.25, nonfinite={30})
    h.global_norm = [math.nan if i == 30 else 5.0 for i in range(n)]
    fs = findings(h)
    codes = {f.code: f for f in fs}
    clip = codes["clipped_every_step"]
    assert clip.remedies[0] == "lower_learning_rate" and clip.evidence["threshold"] == 0.25
    text = M.finding_text(clip, "en")
    assert "clipped at 0.25" in text and "lower the learning rate" in text
    assert "nonfinite_gradients" not in codes
    for f in fs:
        assert "gradient_clipping" not in f.remedies and "skip_nonfinite_steps" not in f.remedies
    inc = codes["incident"]
    assert inc.evidence["nonfinite"] == 1 and inc.layers == ["a.weight"]


def test_nonfinite_that_reached_the_weights_is_still_an_error():
    n = 60
    h = history(falling(n), nonfinite={30})
    h.skipped = [False] * n  # the run did not skip: the NaN went into the weights
    fs = findings(h)
    assert any(f.code == "nonfinite_gradients" and f.severity.value == "error" for f in fs)
    assert any("skip_nonfinite_steps" in f.remedies for f in fs)


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, MIN_STEPS - 1])
def test_too_few_steps_is_said_and_exits_2(n, tmp_path: Path, capsys):
    h = history(falling(max(n, 2))[:n])
    [f] = findings(h)
    assert f.code == "too_few_steps" and f.evidence == {"steps": n, "needed": MIN_STEPS}
    path = tmp_path / "short.jsonl"
    h.to_jsonl(path)
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Too few steps to judge" in err and f"Only {n} steps" in err


@pytest.mark.parametrize("content,match", [
    ('{"step": 0, "loss": 1.0}\nnot json\n', r"garbage\.jsonl:2: not JSON"),
    ('[1, 2]\n', r"garbage\.jsonl:1: not a gradguard history record"),
    ('{"loss": 1.0}\n', r"garbage\.jsonl:1: not a gradguard history record"),
])
def test_bad_input_names_the_line_and_exits_2(content, match, tmp_path: Path, capsys):
    path = tmp_path / "garbage.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        read_jsonl(path)
    assert main(["report", str(path)]) == 2
    assert "garbage.jsonl:" in capsys.readouterr().err


def test_read_jsonl_streams_and_round_trips(tmp_path: Path):
    h = history(falling(50), skipped={10}, lr=[2e-3] * 50)
    path = tmp_path / "run.jsonl"
    h.to_jsonl(path)
    back = read_jsonl(path)
    assert back.step == h.step and back.skipped == h.skipped and back.lr == h.lr
    assert back.loss == pytest.approx(h.loss)


def test_guard_records_the_effective_lr_and_tells_its_rollback():
    """End to end: a Guard run whose loss doubles and stays up rolls back, and its own history
    tells it (step, skips, rollback, recovery)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gg.Guard(model, spike=gg.SpikePolicy(rollback=True, snapshot_every=50), flush_every=10)
    w = torch.randn(8, 1)
    for t in range(250):
        x = torch.randn(32, 8)
        loss = (model(x) - x @ w).pow(2).mean()
        loss.backward()
        opt.param_groups[0]["lr"] = 5.0 if t == 170 else 0.05  # one huge update: the loss jumps
        guard.step(opt, loss=loss)
        opt.zero_grad()
    guard.flush()
    h = guard.history
    assert guard.rollbacks == 1 and h.lr[0] == pytest.approx(0.05) and h.lr[170] == 5.0
    fs = guard.findings()
    inc = [f for f in fs if f.code == "incident"]
    assert len(inc) == 1 and inc[0].evidence["rollbacks"] == 1 and inc[0].evidence["recovered"]
    assert not any(f.severity.value == "error" for f in fs)
