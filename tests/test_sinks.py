import csv
import logging
import math

import pytest
import torch

from gradguard.history import History, HistoryBuffer
from gradguard.sinks import CSVSink, JSONLSink, TensorBoardSink, call_sinks

NAMES = ["enc.weight", "enc.bias"]


def _chunk(start: int, n: int) -> History:
    buf = HistoryBuffer(NAMES, capacity=n)
    for s in range(start, start + n):
        buf.record(s, loss=torch.tensor(2.0 - 0.1 * s), global_norm=torch.tensor(float(s + 1)),
                   per_tensor_norm=torch.tensor([s + 0.5, 0.25]), clipped=torch.tensor(s % 2 == 0))
    return buf.flush()


def test_jsonl_sink_appends_chunks(tmp_path) -> None:
    sink = JSONLSink(tmp_path / "sub" / "run.jsonl")
    sink(_chunk(0, 3))
    sink(_chunk(3, 2))
    back = History.from_jsonl(tmp_path / "sub" / "run.jsonl")
    assert back.step == [0, 1, 2, 3, 4]
    assert back.layer_series("enc.weight") == [0.5, 1.5, 2.5, 3.5, 4.5]
    assert back.clipped == [True, False, True, False, True]


def test_csv_sink_header_once(tmp_path) -> None:
    path = tmp_path / "run.csv"
    sink = CSVSink(path)
    sink(_chunk(0, 2))
    sink(_chunk(2, 2))
    rows = list(csv.reader(open(path)))
    assert rows[0][:3] == ["step", "loss", "global_norm"] and rows[0][-2:] == ["norm/enc.weight", "norm/enc.bias"]
    assert len(rows) == 5 and rows[4][0] == "3" and float(rows[4][2]) == 4.0
    assert rows[1][4] == "1"  # clipped written as 0/1


def test_tensorboard_sink_event_file_reads_back(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path / "tb")
    sink(_chunk(0, 4))
    sink.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "gradguard/global_norm" in tags and "grad_norm/enc.weight" in tags
    assert "gradguard/threshold" not in tags or all(
        math.isinf(e.value) for e in acc.Scalars("gradguard/threshold")
    )
    gn = acc.Scalars("gradguard/global_norm")
    assert [e.step for e in gn] == [0, 1, 2, 3]
    assert [e.value for e in gn] == pytest.approx([1.0, 2.0, 3.0, 4.0])


def test_callable_sink_and_failing_sink_is_logged(caplog) -> None:
    seen: list[int] = []

    def broken(chunk: History) -> None:
        raise OSError("disk full")

    with caplog.at_level(logging.ERROR, logger="gradguard.sinks"):
        call_sinks([broken, lambda c: seen.extend(c.step)], _chunk(0, 3))
    assert seen == [0, 1, 2]
    assert "sink" in caplog.text and "disk full" in caplog.text
