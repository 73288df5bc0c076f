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


def test_tensorboard_histograms_every_k_flushes(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path / "tb", histogram_every=2)
    for k in range(4):  # four flushes of 3 steps: histograms at the 2nd and 4th
        sink(_chunk(3 * k, 3))
    sink.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0})
    acc.Reload()
    assert sorted(acc.Tags()["histograms"]) == ["grad_norm_hist/enc.bias", "grad_norm_hist/enc.weight"]
    events = acc.Histograms("grad_norm_hist/enc.weight")
    assert [e.step for e in events] == [5, 11]
    h = events[0].histogram_value
    # the 2nd flush held steps 3..5, whose enc.weight norms are 3.5, 4.5, 5.5
    assert (h.num, h.min, h.max, h.sum) == (3, 3.5, 5.5, pytest.approx(13.5))
    with pytest.raises(ValueError, match="`histogram_every` must be >= 0"):
        TensorBoardSink(tmp_path / "x", histogram_every=-1)


def _wandb_history(path) -> list[dict]:
    """The history records of a W&B transaction log (leveldb log format: 7-byte file header,
    32 KiB blocks of records with a crc32/length/type header), parsed with wandb's protobuf.

    ``run.finish()`` can return before wandb's core process has written the end of the log, so
    this waits (up to 30 s) for the run's closing ``exit`` record before reading the history."""
    import json
    import time

    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + 30
    while True:
        data = path.read_bytes()
        if _wandb_records(data, pb, "exit") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    rows = []
    for rec in _wandb_records(data, pb, "history"):
        rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in rec.history.item})
    return rows


def _wandb_records(data: bytes, pb, kind_wanted: str) -> list:
    import struct

    assert data[:4] == b":W&B"
    pos, block, out, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block trailer too small for a header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # still being written
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: one complete record
            rec = pb.Record()
            rec.ParseFromString(pending)
            pending = b""
            if rec.WhichOneof("record_type") == kind_wanted:
                out.append(rec)
    return out


def test_wandb_sink_offline(tmp_path, monkeypatch) -> None:
    wandb = pytest.importorskip("wandb")
    from gradguard.sinks import WandbSink

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    sink = WandbSink(per_layer=True)
    with pytest.raises(RuntimeError, match=r"call wandb.init\(...\) before training"):
        sink(_chunk(0, 1))
    run = wandb.init(mode="offline", dir=str(tmp_path), project="gradguard-test")
    try:
        run.log({"user/acc": 0.5})  # the user's own logging keeps its own step counter
        sink(_chunk(0, 3))
        sink(_chunk(3, 2))
    finally:
        run.finish()
    log = next(tmp_path.rglob("run-*.wandb"))
    rows = [r for r in _wandb_history(log) if "gradguard/step" in r]
    assert [r["gradguard/step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["gradguard/global_norm"] for r in rows] == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0])
    assert [r["gradguard/grad_norm/enc.weight"] for r in rows] == pytest.approx([0.5, 1.5, 2.5, 3.5, 4.5])
    assert [r["gradguard/clipped"] for r in rows] == [1.0, 0.0, 1.0, 0.0, 1.0]


def test_mlflow_sink_local_file_store(tmp_path, monkeypatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    from gradguard.sinks import MLflowSink

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it with file: stores
    uri = (tmp_path / "mlruns").as_uri()
    mlflow.set_tracking_uri(uri)
    try:
        sink = MLflowSink(per_layer=True)
        with pytest.raises(RuntimeError, match=r"call mlflow.start_run\(\) before training"):
            sink(_chunk(0, 1))
        with mlflow.start_run() as run:
            sink(_chunk(0, 3))
            sink(_chunk(3, 2))
        client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        hist = client.get_metric_history(run.info.run_id, "gradguard/global_norm")
        assert [(m.step, m.value) for m in hist] == [(s, s + 1.0) for s in range(5)]
        layer = client.get_metric_history(run.info.run_id, "gradguard/grad_norm/enc.bias")
        assert [m.value for m in layer] == [0.25] * 5
        assert not client.get_metric_history(run.info.run_id, "gradguard/threshold")  # inf: none
        # an explicit run id, outside any active run
        MLflowSink(run.info.run_id, tracking_uri=uri, per_layer=False)(_chunk(5, 1))
        assert len(client.get_metric_history(run.info.run_id, "gradguard/global_norm")) == 6
    finally:
        mlflow.set_tracking_uri(None)
