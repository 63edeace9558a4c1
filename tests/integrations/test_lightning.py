"""Lightning: a monitored fit leaves .grad exactly as Lightning's own loop does (plain, accumulation with a short
last group, fp16 with the precision plugin's scaler, bf16, DDP), measures the Gram of the task losses, logs on the
trainer's schedule and closes the monitor when fitting ends."""

from __future__ import annotations

import copy
import os
import socket
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.loggers import Logger  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

from gradconflict import MeasurementWarning  # noqa: E402
from gradconflict.integrations.lightning import ConflictCallback, ConflictMonitorMixin  # noqa: E402

WEIGHTS = {"a": 1.0, "b": 0.5}


def dataset(n: int = 40) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x[:, :1] - x[:, 1:2], (x[:, 2:3] * 3).sin())


class TwoTasks(pl.LightningModule):
    """Lightning's own loop, no monitor: the reference."""

    def __init__(self, batches: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.heads = nn.ModuleDict({"a": nn.Linear(16, 1), "b": nn.Linear(16, 1)})
        self.batches = batches

    def task_losses(self, batch):
        x, ya, yb = batch
        h = self.backbone(x)
        return {
            "a": nn.functional.mse_loss(self.heads["a"](h), ya),
            "b": nn.functional.mse_loss(self.heads["b"](h), yb),
        }

    def training_step(self, batch, batch_idx):
        losses = self.task_losses(batch)
        return {"loss": sum(WEIGHTS[t] * v for t, v in losses.items()), "task_losses": losses, "task_weights": WEIGHTS}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(dataset(8 * self.batches), batch_size=8)


class Monitored(ConflictMonitorMixin, TwoTasks):
    """The same module with the mixin (training_step inherited, wrapped by the mixin)."""


class Grads(pl.Callback):
    """Records .grad (as the optimizer will see it) and the parameters before each optimizer step."""

    def __init__(self) -> None:
        self.grads, self.params = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.params.append(copy.deepcopy(pl_module.state_dict()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters()})


class Memory(Logger):
    """A logger that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


def fit(module, *callbacks, ckpt_path=None, **trainer_kwargs):
    trainer_kwargs = {
        "accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False,
        "logger": False, "enable_checkpointing": False, **trainer_kwargs,
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|fast_dev_run).*")
        trainer = pl.Trainer(callbacks=list(callbacks), **trainer_kwargs)
        trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def reference_gram(state, batches, weights_dtype=torch.float64):
    """T separate autograd.grad calls in float64 on a copy of the module as it was, each task's gradient summed
    over the group's micro-batches: the oracle for a (group's) Gram."""
    twin = TwoTasks().to(weights_dtype)
    twin.load_state_dict(state)
    shared = list(twin.backbone.parameters())
    rows = []
    for task in ("a", "b"):
        total = [torch.zeros_like(p) for p in shared]
        for batch in batches:
            loss = twin.task_losses([t.to(weights_dtype) for t in batch])[task]
            for acc, g in zip(total, torch.autograd.grad(loss, shared)):
                acc += g
        rows.append(torch.cat([g.flatten() for g in total]))
    J = torch.stack(rows)
    return J @ J.T


SETUPS = {
    "plain": {},
    "accumulation": {"accumulate_grad_batches": 2},  # 5 batches: groups of 2, 2 and a short last one of 1
    "fp16-scaler": {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1e3))]},
    "bf16": {"precision": "bf16-mixed"},
}


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_grad_equals_lightnings_own_loop(setup):
    kwargs = SETUPS[setup]
    plain, monitored = Grads(), Grads()
    fit(TwoTasks(), plain, fast_dev_run=5, **copy.deepcopy(kwargs))
    callback = ConflictCallback(shared="backbone")
    fit(Monitored(), monitored, callback, fast_dev_run=5, **copy.deepcopy(kwargs))
    assert len(monitored.grads) == len(plain.grads) == (3 if setup == "accumulation" else 5)
    for step, (got, expected) in enumerate(zip(monitored.grads, plain.grads)):
        for name in expected:
            assert torch.equal(got[name], expected[name]), (setup, step, name)
    monitor = callback.monitor
    assert monitor.closed  # closed when fitting ended
    reports = monitor.history.measured
    assert len(reports) == len(plain.grads)  # fast_dev_run logs every step, so every step is measured
    assert [r.step for r in reports] == list(range(1, len(plain.grads) + 1))  # the trainer's step count after it
    assert reports[0].weights.tolist() == [1.0, 0.5]
    if setup == "accumulation":
        assert {r.strategy for r in reports} == {"accumulated"}
    if setup in ("plain", "accumulation"):  # fp32: the first (group's) Gram against the float64 oracle
        data = list(DataLoader(dataset(40), batch_size=8))
        first = data[:2] if setup == "accumulation" else data[:1]
        expected = reference_gram(monitored.params[0], first)
        torch.testing.assert_close(reports[0].gram.double(), expected, rtol=1e-5, atol=1e-9)
    else:  # mixed precision: the Gram is reported unscaled, at the scale of the fp32 one
        expected = reference_gram(monitored.params[0], list(DataLoader(dataset(40), batch_size=8))[:1])
        torch.testing.assert_close(reports[0].gram.double(), expected, rtol=5e-2, atol=1e-6)


class WithIds(Monitored):
    """The monitored module, its batches carrying their dataset indices, returned as ``sample_ids``."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch[:3], batch_idx)
        return {**out, "sample_ids": batch[3]}

    def train_dataloader(self):
        data = dataset(8 * self.batches)
        return DataLoader(TensorDataset(*data.tensors, torch.arange(8 * self.batches)), batch_size=8)


def test_sample_ids_in_the_step_output_attribute_each_group_to_its_examples():
    # accumulate_grad_batches=2 over 5 batches of 8: groups of 16, 16 and a short last one of 8 (closed when the
    # optimizer steps); .grad stays Lightning's own.
    plain, monitored = Grads(), Grads()
    fit(TwoTasks(), plain, fast_dev_run=5, accumulate_grad_batches=2)
    callback = ConflictCallback(shared="backbone")
    fit(WithIds(), monitored, callback, fast_dev_run=5, accumulate_grad_batches=2)
    for got, expected in zip(monitored.grads, plain.grads, strict=True):
        assert all(torch.equal(got[name], expected[name]) for name in expected)
    history = callback.monitor.history
    assert [r.strategy for r in history.measured] == ["accumulated"] * 3
    tally = history.samples.pair("a", "b")  # the per-id aggregates (the history keeps no step's examples)
    assert sorted(tally) == list(range(40)) and all(row["count"] == 1 for row in tally.values())
    # each example's push is its part in its group's 2 G_ab: over every example, twice the groups' G_ab
    pushes = sum(row["push"] for row in tally.values())
    assert pushes == pytest.approx(2 * sum(float(r.gram[0, 1]) for r in history.measured), rel=1e-5)


def test_logs_on_the_trainers_schedule_and_only_measures_logged_steps():
    logger, callback = Memory(), ConflictCallback(shared="backbone")
    fit(Monitored(batches=7), callback, max_steps=7, log_every_n_steps=3, logger=logger)
    logged = {step: row for step, row in logger.rows if any(k.startswith("conflict/") for k in row)}
    assert sorted(logged) == [2, 5]  # Lightning logs optimizer steps 3 and 6 (0-based 2 and 5)
    reports = callback.monitor.history.measured
    assert [r.step for r in reports] == [3, 6]  # nothing else was measured
    for report, step in zip(reports, sorted(logged)):
        row = logged[step]
        assert row["conflict/cos/a/b"] == pytest.approx(float(report.cosine[0, 1]))
        assert row["conflict/cancellation"] == pytest.approx(float(report.cancellation))
        assert not any(key.startswith("conflict/layer/") for key in row)  # a quiet log by default


def test_layers_true_logs_each_shared_layer():
    logger, callback = Memory(), ConflictCallback(shared="backbone", layers=True)
    fit(Monitored(batches=3), callback, max_steps=3, log_every_n_steps=3, logger=logger)
    (report,) = callback.monitor.history.measured
    ((_, row),) = [(step, row) for step, row in logger.rows if any(k.startswith("conflict/") for k in row)]
    worst = {k for k in row if k.startswith("conflict/layer/") and k.endswith("/worst_cosine")}
    assert worst == {f"conflict/layer/{name}/worst_cosine" for name in report.layers}
    first = report.layers["backbone.0"]
    assert row["conflict/layer/backbone.0/worst_cosine"] == pytest.approx(float(first.cosine[0, 1]))


def test_every_measures_more_often_than_the_trainer_logs():
    callback = ConflictCallback(shared="backbone", every=1)
    fit(Monitored(batches=4), callback, max_steps=4, log_every_n_steps=50)
    assert len(callback.monitor.history.measured) == 4


def test_a_checkpoint_carries_the_monitor(tmp_path):
    callback = ConflictCallback(shared="backbone", every=1)
    trainer = fit(Monitored(batches=3), callback, max_steps=3)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    resumed = ConflictCallback(shared="backbone", every=1)
    fit(Monitored(batches=3), resumed, max_steps=5, ckpt_path=tmp_path / "run.ckpt")
    assert [r.step for r in resumed.monitor.history.measured] == [1, 2, 3, 4, 5]


def test_misuse_is_refused_with_what_to_do():
    with pytest.raises(TypeError, match="ConflictMonitorMixin"):
        fit(TwoTasks(), ConflictCallback(), fast_dev_run=1)

    class Backwards(TwoTasks, ConflictMonitorMixin):
        pass

    with pytest.raises(TypeError, match="put the mixin first"):
        fit(Backwards(), ConflictCallback(), fast_dev_run=1)
    with pytest.raises(ValueError, match="may not set"):
        ConflictCallback(monitor_options={"every": 2})


def test_a_step_without_task_losses_trains_as_usual_and_says_so():
    class LossOnly(Monitored):
        def training_step(self, batch, batch_idx):
            return sum(self.task_losses(batch).values())

    class LossOnlyPlain(TwoTasks):
        def training_step(self, batch, batch_idx):
            return sum(self.task_losses(batch).values())

    plain, monitored = Grads(), Grads()
    fit(LossOnlyPlain(), plain, fast_dev_run=2)
    with pytest.warns(MeasurementWarning, match="no 'task_losses' field"):
        fit(LossOnly(), monitored, ConflictCallback(), fast_dev_run=2)
    for got, expected in zip(monitored.grads, plain.grads):
        assert all(torch.equal(got[n], expected[n]) for n in expected)


def _ddp_worker(rank: int, port: int, out: str) -> None:
    """One of 2 CPU processes: Lightning's DDP strategy joins this process group (as under torchrun), fits the
    plain module then the monitored one, and saves the .grad each stepped with."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    plain, monitored, callback = Grads(), Grads(), ConflictCallback(shared="backbone")
    fit(TwoTasks(), plain, fast_dev_run=3, strategy="ddp", devices=2)
    fit(Monitored(), monitored, callback, fast_dev_run=3, strategy="ddp", devices=2)
    steps = [r.step for r in callback.monitor.history.measured]
    torch.save({"plain": plain.grads, "monitored": monitored.grads, "steps": steps}, f"{out}-{rank}.pt")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available in this build")
def test_ddp_grad_equals_lightnings_own_ddp(tmp_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(port, str(tmp_path / "grads")), nprocs=2, join=True)
    for rank in range(2):
        saved = torch.load(tmp_path / f"grads-{rank}.pt")
        assert len(saved["monitored"]) == len(saved["plain"]) == 3
        for got, expected in zip(saved["monitored"], saved["plain"]):
            assert all(torch.equal(got[n], expected[n]) for n in expected)
        assert saved["steps"] == [1, 2, 3]
