"""The W&B sink, in a real offline run (``WANDB_MODE=offline``) read back from the run's transaction log."""

from __future__ import annotations

import json
import struct

import pytest

from gradconflict.integrations.wandb import WandbSink
from tests.records.sinks.helpers import known_report, monitored_run

wandb = pytest.importorskip("wandb")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Everything W&B writes goes under ``tmp_path``; nothing leaves the machine."""
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def logged_rows(root):
    """The history rows of the offline run under ``root``, from its ``.wandb`` file: W&B's header (7 bytes), then
    LevelDB-log records (32 KiB blocks; each record a 7-byte header: CRC32, length, type 1 full / 2 first /
    3 middle / 4 last) holding protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    wandb.teardown()  # the W&B service writes the file in the background: wait for it to finish
    (path,) = root.glob("wandb/offline-run-*/run-*.wandb")
    raw, pos, pending, rows = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        chunk, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
    return rows


def test_an_offline_run_holds_each_step_at_its_step(offline):
    run = wandb.init(project="gradconflict-test", mode="offline")
    sink = WandbSink(image_every=10)  # the active run
    for step in (0, 5, 12):
        sink.write(known_report(step=step, tasks="cba"))
    sink.close()
    run.finish()
    rows = logged_rows(offline)
    assert [r["_step"] for r in rows] == [0, 5, 12]
    assert [r["conflict/cos/a/b"] for r in rows] == pytest.approx([-1 / 3] * 3)
    assert rows[0]["conflict/loss/b"] == 2.0 and "conflict/layer/body.0/cos/a/b" not in rows[0]
    with_image = [r["_step"] for r in rows if r.get("conflict/cosine/_type") == "image-file"]
    assert with_image == [0, 12]
    assert list(offline.glob("wandb/offline-run-*/files/media/images/conflict/cosine_*.png"))


def test_a_monitored_run_logs_the_oracle_cosine(offline):
    run = wandb.init(project="gradconflict-test", mode="offline")
    try:
        expected = monitored_run(WandbSink(run, layers=True))
    finally:
        run.finish()
    rows = logged_rows(offline)
    assert [r["conflict/cos/a/b"] for r in rows] == pytest.approx(expected, rel=1e-9)
    assert any(k.startswith("conflict/layer/backbone.") for k in rows[0])


def test_without_a_run_the_error_says_what_to_do(offline):
    assert wandb.run is None
    with pytest.raises(ValueError, match=r"wandb.init"):
        WandbSink()
