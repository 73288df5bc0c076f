"""Guard -> TensorBoard / CSV sinks, read back from disk."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

import gradguard as gg

torch.set_num_threads(1)


def test_guard_writes_tensorboard_and_csv(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tb = gg.TensorBoardSink(tmp_path / "tb")
    guard = gg.Guard(model, clip=gg.ZClip(warmup=2), flush_every=3,
                     sinks=[tb, gg.CSVSink(tmp_path / "run.csv")])
    for t in range(6):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        guard.step(opt, loss=loss)
        opt.zero_grad()
    guard.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"gradguard/global_norm", "gradguard/loss", "grad_norm/0.weight"} <= set(tags)
    events = acc.Scalars("gradguard/global_norm")
    assert [e.step for e in events] == list(range(6))
    assert [e.value for e in events] == pytest.approx(guard.history.global_norm, rel=1e-6)
    rows = list(csv.DictReader(open(tmp_path / "run.csv")))
    assert [int(r["step"]) for r in rows] == list(range(6))
    assert float(rows[0]["norm/2.bias"]) == pytest.approx(guard.history.layer_norm[0][3], rel=1e-6)
