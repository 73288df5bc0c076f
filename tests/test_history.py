import math

import pytest
import torch

from gradguard.history import SCALAR_FIELDS, History, HistoryBuffer
from gradguard.testing import count_host_syncs

NAMES = ["0.weight", "0.bias", "2.weight"]


def _fill(buf: HistoryBuffer, n: int, start: int = 0) -> None:
    for s in range(start, start + n):
        buf.record(
            s,
            loss=torch.tensor(1.0 / (s + 1)),
            global_norm=torch.tensor(float(s)),
            per_tensor_norm=torch.tensor([s, 2.0 * s, 3.0 * s]),
            threshold=torch.tensor(5.0) if s % 2 else math.inf,
            clipped=torch.tensor(s > 5),
            skipped=torch.tensor(s == 3),
            lr_scale=0.5,
            update_ratio=torch.tensor([1e-3, float("nan"), 2e-3]) if s % 2 else None,
        )


def test_record_is_sync_free_and_flush_syncs_once() -> None:
    buf = HistoryBuffer(NAMES, capacity=10)
    with count_host_syncs() as c:
        _fill(buf, 10)
    assert c.count == 0, c.ops
    with count_host_syncs() as c:
        hist = buf.flush()
    assert c.count == 1, c.ops
    assert len(hist) == 10 and len(buf) == 0
    assert hist.step == list(range(10))
    assert hist.global_norm[7] == 7.0
    assert hist.layer_norm[4] == [4.0, 8.0, 12.0]
    assert hist.clipped == [s > 5 for s in range(10)]
    assert hist.skipped == [s == 3 for s in range(10)]
    assert hist.threshold[0] == math.inf and hist.threshold[1] == 5.0
    assert math.isnan(hist.update_ratio[0][0]) and hist.update_ratio[1][0] == pytest.approx(1e-3)
    assert hist.lr_scale == [0.5] * 10


def test_buffer_full_raises_and_refills_after_flush() -> None:
    buf = HistoryBuffer(NAMES, capacity=3)
    _fill(buf, 3)
    with pytest.raises(RuntimeError, match="flush"):
        _fill(buf, 1, start=3)
    assert len(buf.flush()) == 3
    _fill(buf, 2, start=3)
    assert buf.flush().step == [3, 4]


def test_loss_none_is_nan() -> None:
    buf = HistoryBuffer(["w"], capacity=2)
    buf.record(0, global_norm=torch.tensor(1.0), per_tensor_norm=torch.tensor([1.0]))
    h = buf.flush()
    assert math.isnan(h.loss[0]) and h.threshold[0] == math.inf and h.clipped == [False]


def test_jsonl_round_trip_keeps_nonfinite(tmp_path) -> None:
    buf = HistoryBuffer(NAMES, capacity=10)
    _fill(buf, 10)
    hist = buf.flush()
    hist.global_norm[2] = math.inf
    hist.layer_norm[2][1] = math.nan
    path = tmp_path / "run.jsonl"
    hist.to_jsonl(path)
    back = History.from_jsonl(path)
    assert back.names == NAMES and back.step == hist.step
    assert back.global_norm[2] == math.inf and math.isnan(back.layer_norm[2][1])
    assert back.layer_norm[5] == hist.layer_norm[5]
    assert back.clipped == hist.clipped and back.skipped == hist.skipped
    assert "NaN" not in path.read_text()  # strict JSON: non-finite floats become strings


def test_from_jsonl_errors_name_the_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        History.from_jsonl(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl"):
        History.from_jsonl(bad)


def test_extend_tail_and_max_rows() -> None:
    buf = HistoryBuffer(NAMES, capacity=10)
    _fill(buf, 10)
    a = buf.flush()
    _fill(buf, 10, start=10)
    a.extend(buf.flush(), max_rows=15)
    assert a.step == list(range(5, 20))
    assert a.tail(3).step == [17, 18, 19]
    assert a.layer_series("2.weight")[-1] == 57.0
    with pytest.raises(KeyError, match="nope"):
        a.layer_series("nope")
    with pytest.raises(ValueError, match="different tensor names"):
        a.extend(History(["x"]))


def test_state_dict_round_trip_keeps_pending_rows() -> None:
    buf = HistoryBuffer(NAMES, capacity=10)
    _fill(buf, 4)
    sd = buf.state_dict()
    other = HistoryBuffer(NAMES, capacity=10)
    other.load_state_dict(sd)
    assert other.flush().layer_norm == buf.flush().layer_norm
    with pytest.raises(ValueError, match="different parameters"):
        HistoryBuffer(["a"], capacity=10).load_state_dict(sd)


def test_scalar_fields_are_the_documented_columns() -> None:
    assert SCALAR_FIELDS == ("loss", "global_norm", "threshold", "clipped", "skipped", "lr_scale",
                             "lr")
