"""The TensorBoard sink, read back from its event files with TensorBoard's own reader."""

from __future__ import annotations

import pytest
import torch

from gradconflict import ConflictReport
from gradconflict.integrations.tensorboard import TensorBoardSink
from tests.records.sinks.helpers import TOP, expected_cosine, known_report, monitored_run

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read(log_dir):
    events = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_scalars_and_images_under_conflict_tags(tmp_path):
    sink = TensorBoardSink(tmp_path, image_every=10)
    for step in range(0, 25, 4):  # images due at 0, 12, 24
        sink.write(known_report(step=step, tasks="bca"))
    sink.write(ConflictReport.skipped_step(("a", "b"), 26, "non-finite loss", losses=torch.tensor([1.0, 2.0])))
    sink.close()
    events = read(tmp_path)
    tags = events.Tags()
    cos = events.Scalars("conflict/cos/a/b")
    assert [e.step for e in cos] == list(range(0, 25, 4))
    assert [e.value for e in cos] == pytest.approx([-1 / 3] * 7, rel=1e-6)
    assert events.Scalars("conflict/layer/body.1/cos/a/b")[0].value == pytest.approx(expected_cosine(TOP, 0, 1))
    assert "conflict/cancellation" in tags["scalars"] and "conflict/layer/body.0/worst_cosine" in tags["scalars"]
    assert [e.step for e in events.Scalars("conflict/loss/a")][-1] == 26  # a skipped step still logs its losses
    assert [e.step for e in events.Images("conflict/cosine")] == [0, 12, 24]
    image = events.Images("conflict/cosine")[0]
    assert image.width > 100 and image.height > 100


def test_a_writer_of_the_loop_is_flushed_not_closed(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    sink = TensorBoardSink(writer=writer, layers=False, image_every=None)
    sink.write(known_report(step=0))
    sink.close()
    writer.add_scalar("loss", 1.0, 0)  # still open
    writer.close()
    tags = read(tmp_path).Tags()["scalars"]
    assert "loss" in tags and "conflict/cos/a/b" in tags and not any(t.startswith("conflict/layer/") for t in tags)


def test_a_monitored_run_logs_the_oracle_cosine(tmp_path):
    expected = monitored_run(TensorBoardSink(tmp_path, image_every=2))
    events = read(tmp_path)
    assert [e.value for e in events.Scalars("conflict/cos/a/b")] == pytest.approx(expected, rel=1e-6)
    assert [e.step for e in events.Images("conflict/cosine")] == [0, 2]
    assert any(t.startswith("conflict/layer/backbone.") for t in events.Tags()["scalars"])


def test_bad_image_schedule_is_refused(tmp_path):
    with pytest.raises(ValueError, match="image_every"):
        TensorBoardSink(tmp_path, image_every=-1)
