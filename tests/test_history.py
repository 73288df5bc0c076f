import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
    row = hist.layer_norm[2]
    row[1] = math.nan
    hist.layer_norm[2] = row  # rows are copies: assign the row back
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


def test_history_memory_at_5000_tensors_and_2000_rows() -> None:
    """float32 per-tensor columns and update ratios only where measured: 4 bytes per
    (row, tensor) plus 4 per (measured row, tensor), measured with tracemalloc (Python floats
    in lists took 64 bytes)."""
    import tracemalloc

    n, rows, every = 5000, 2000, 50
    names = [f"layer{i}.weight" for i in range(n)]
    buf = HistoryBuffer(names, capacity=every, ratio_capacity=1)
    norms, ratio = torch.rand(n), torch.rand(n)
    tracemalloc.start()
    hist = History(names)
    for chunk in range(rows // every + 4):  # 200 rows more than kept: the oldest are dropped
        for r in range(every):
            step = chunk * every + r
            buf.record(step, global_norm=norms[0], per_tensor_norm=norms,
                       update_ratio=ratio if r == 0 else None)
        hist.extend(buf.flush(), max_rows=rows)
    used, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(hist) == rows and hist.step[0] == 200 and hist.step[-1] == rows + 199
    measured = rows // every
    data = 4 * n * rows + 4 * n * measured + 64 * rows  # norms, ratios, step + 6 scalars per row
    assert hist.nbytes <= data
    # array.array over-allocates by up to 1/8 when it grows; 1 MB for the rest
    assert used <= data * 9 // 8 + 1_000_000, (used, data)
    assert used / (n * rows) < 4.8  # bytes per (row, tensor), against the 8-byte target
    assert hist.update_ratio[0] == pytest.approx(ratio.tolist()) and math.isnan(hist.update_ratio[1][0])
    assert hist.layer_norm[-1] == pytest.approx(norms.tolist())


def test_columns_read_like_lists_and_scalar_fields_are_generic() -> None:
    hist = History(["a", "b"])
    for s in range(3):
        hist.step.append(s)
        hist.loss.append(1.0 / (s + 1))
        hist.skipped.append(s == 1)
        hist.layer_norm.append([s, 2 * s])
        hist.update_ratio.append([math.nan, math.nan] if s else [0.5, 0.25])
    assert hist.skipped == [False, True, False] and hist.skipped[1] is True
    assert isinstance(hist.step[0], int) and list(hist.loss)[2] == pytest.approx(1 / 3)
    assert hist.layer_norm[2] == [2.0, 4.0] and hist.update_ratio[0] == [0.5, 0.25]
    assert all(math.isnan(v) for v in hist.update_ratio[2])
    assert hist.update_ratio.nbytes < hist.layer_norm.nbytes  # unmeasured rows cost nothing
    assert math.isnan(hist.threshold[0]) if len(hist.threshold) else True
    with pytest.raises(AttributeError, match="no column 'nope'"):
        _ = hist.nope
    with pytest.raises(ValueError, match="2 values"):
        hist.layer_norm.append([1.0])
    # every name in SCALAR_FIELDS is a column, a record() keyword and a JSONL field
    assert all(hasattr(hist, f) for f in SCALAR_FIELDS)
    buf = HistoryBuffer(["a"], capacity=2)
    with pytest.raises(TypeError, match="unknown history column"):
        buf.record(0, global_norm=torch.tensor(1.0), per_tensor_norm=torch.ones(1), momentum=0.1)


def test_pending_rows_of_a_v0_1_checkpoint_load() -> None:
    """gradguard 0.1 kept one (scalars | norms | ratios) row per step; its checkpoints load."""
    k, n = 6, len(NAMES)  # 0.1's columns: loss, global_norm, threshold, clipped, skipped, lr_scale
    rows = torch.full((2, k + 2 * n), math.nan)
    rows[:, :k] = torch.tensor([[1.0, 2.0, math.inf, 0.0, 0.0, 1.0], [0.5, 3.0, math.inf, 1.0, 0.0, 1.0]])
    rows[:, k:k + n] = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    rows[1, k + n:] = torch.tensor([0.1, 0.2, 0.3])
    buf = HistoryBuffer(NAMES, capacity=4)
    buf.load_state_dict({"names": NAMES, "steps": [7, 8], "rows": rows})
    h = buf.flush()
    assert h.step == [7, 8] and h.clipped == [False, True] and h.layer_norm[1] == [4.0, 5.0, 6.0]
    assert all(math.isnan(v) for v in h.update_ratio[0]) and h.update_ratio[1] == pytest.approx([0.1, 0.2, 0.3])


_f32 = st.floats(width=32, allow_nan=False)
_rows = st.lists(st.tuples(st.lists(_f32, min_size=2, max_size=2), st.booleans(),
                           st.lists(_f32, min_size=2, max_size=2)), max_size=12)


@settings(max_examples=60, deadline=None)
@given(a=_rows, b=_rows, max_rows=st.integers(1, 30), n_tail=st.integers(0, 30))
def test_columns_behave_like_lists(a, b, max_rows, n_tail) -> None:
    """extend / max_rows / tail on the compact columns equal the same on plain lists."""
    def build(rows, start):
        h = History(["x", "y"])
        for i, (norms, measured, ratio) in enumerate(rows):
            h.step.append(start + i)
            h.loss.append(norms[0])
            h.skipped.append(measured)
            h.layer_norm.append(norms)
            h.update_ratio.append(ratio if measured else [math.nan, math.nan])
        return h

    ref = [(i, norms, measured, ratio) for i, (norms, measured, ratio) in enumerate(a + b)][-max_rows:]
    hist = build(a, 0)
    hist.extend(build(b, len(a)), max_rows=max_rows)
    assert hist.step == [r[0] for r in ref]
    assert hist.loss == [r[1][0] for r in ref] and hist.skipped == [r[2] for r in ref]
    assert [list(r) for r in hist.layer_norm] == [r[1] for r in ref]
    for got, (_, _, measured, ratio) in zip(hist.update_ratio, ref):
        assert got == ratio if measured else all(math.isnan(v) for v in got)
    tail = hist.tail(n_tail)
    assert tail.step == hist.step[-n_tail:] if n_tail else len(tail) == 0
    assert list(tail.layer_norm) == list(hist.layer_norm)[len(hist) - len(tail):]
