"""Hugging Face Trainer: a tiny BERT built from a config, two tasks. A monitored run leaves .grad exactly as the
plain Trainer does (plain, accumulation with a short last group, bf16, fp16 as the CPU runs it, DDP on two gloo
processes), measures the Gram of the task losses the model returns, adds the figures to the Trainer's log at its
logging steps (the per-layer ones only when asked), saves the monitor in the Trainer's checkpoints and resumes it
from them, and closes the monitor when train() ends."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from gradconflict import MeasurementWarning  # noqa: E402
from gradconflict.integrations.huggingface import ConflictTrainer  # noqa: E402

CONFIG = {
    "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
    "max_position_embeddings": 16,
}


class BertTwoTasks(nn.Module):
    """A BERT backbone from a config (no download), a classification and a regression head."""

    def __init__(self, dropout: float = 0.1, task_losses: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = transformers.BertConfig(**CONFIG, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        self.backbone = transformers.BertModel(config, add_pooling_layer=False)
        self.heads = nn.ModuleDict({"cls": nn.Linear(16, 3), "reg": nn.Linear(16, 1)})
        self.with_task_losses = task_losses

    def task_losses(self, input_ids, attention_mask, label_cls, label_reg):
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        return {
            "cls": nn.functional.cross_entropy(self.heads["cls"](h), label_cls),
            "reg": nn.functional.mse_loss(self.heads["reg"](h).squeeze(-1), label_reg),
        }

    def forward(self, input_ids, attention_mask, label_cls, label_reg):
        losses = self.task_losses(input_ids, attention_mask, label_cls, label_reg)
        out = {"loss": losses["cls"] + 0.5 * losses["reg"]}
        if self.with_task_losses:
            out.update(task_losses=losses, task_weights={"cls": 1.0, "reg": 0.5})
        return out


def dataset(n: int = 40) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (n, 10), generator=g)
    mask = torch.ones(n, 10, dtype=torch.long)
    mask[::2, 7:] = 0  # padded rows: the mask must reach the attention
    return [
        {"input_ids": ids[i], "attention_mask": mask[i], "label_cls": ids[i, 0] % 3, "label_reg": ids[i, 1] / 40.0}
        for i in range(n)
    ]


class Grads(transformers.TrainerCallback):
    """Records .grad as the optimizer sees it at each step."""

    def __init__(self) -> None:
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


class Inputs(ConflictTrainer):
    """Keeps the batches it trains on (for the oracle)."""

    def training_step(self, model, inputs, *args, **kwargs):
        self.seen = getattr(self, "seen", []) + [{k: v.clone() for k, v in inputs.items()}]
        return super().training_step(model, inputs, *args, **kwargs)


def train(trainer_cls, model, tmp_path, *callbacks, trainer_kwargs=None, **args):
    args = {"logging_steps": 1, "per_device_train_batch_size": 8, "save_strategy": "no", **args}
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path), learning_rate=1e-2, report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
        **args,
    )
    trainer = trainer_cls(model=model, args=arguments, train_dataset=dataset(), callbacks=list(callbacks),
                          **(trainer_kwargs or {}))
    trainer.train()
    return trainer


SETUPS = {
    "plain": {"max_steps": 4},
    "accumulation": {"num_train_epochs": 1, "gradient_accumulation_steps": 2},  # 5 batches: 2, 2 and a short 1
    "bf16": {"max_steps": 3, "bf16": True},
    # On CPU the accelerator autocasts to float16 without a loss scaler (it has none off CUDA); the monitor's
    # handling of a GradScaler is tested with the monitor's own (tests/monitor) and with Lightning's "16-mixed".
    "fp16": {"max_steps": 3, "fp16": True},
}


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_grad_equals_the_plain_trainers(setup, tmp_path):
    plain, monitored = Grads(), Grads()
    train(transformers.Trainer, BertTwoTasks(), tmp_path / "plain", plain, **SETUPS[setup])
    trainer = train(ConflictTrainer, BertTwoTasks(), tmp_path / "monitored", monitored,
                    trainer_kwargs={"shared": "backbone"}, **SETUPS[setup])
    steps = 3 if setup == "accumulation" else SETUPS[setup]["max_steps"]
    assert len(monitored.grads) == len(plain.grads) == steps
    for step, (got, expected) in enumerate(zip(monitored.grads, plain.grads)):
        assert got.keys() == expected.keys()
        for name in expected:
            assert torch.equal(got[name], expected[name]), (setup, step, name)
    monitor = trainer.conflict_monitor
    assert monitor.closed
    reports = monitor.history.measured
    assert [r.step for r in reports] == list(range(1, steps + 1))  # logging_steps=1: every step measured
    if setup == "accumulation":
        assert {r.strategy for r in reports} == {"accumulated"}


class BertWithIds(BertTwoTasks):
    """The same model, its batches carrying their dataset indices, returned as ``sample_ids``."""

    def forward(self, input_ids, attention_mask, label_cls, label_reg, sample_id):
        return {**super().forward(input_ids, attention_mask, label_cls, label_reg), "sample_ids": sample_id}


def test_sample_ids_in_the_models_output_attribute_each_group_to_its_examples(tmp_path):
    # One epoch of 40 examples in batches of 8, two batches a group: groups of 16, 16 and a short last one of 8.
    # .grad stays the plain Trainer's; each group's contributions sum to its attributed Gram, and each example is
    # tallied once.
    def with_ids(trainer_cls, folder, *callbacks, **kwargs):
        arguments = transformers.TrainingArguments(
            output_dir=str(tmp_path / folder), learning_rate=1e-2, report_to="none", use_cpu=True, seed=0,
            disable_tqdm=True, logging_steps=1, per_device_train_batch_size=8, save_strategy="no",
            num_train_epochs=1, gradient_accumulation_steps=2,
        )
        data = [{**row, "sample_id": torch.tensor(i)} for i, row in enumerate(dataset())]
        trainer = trainer_cls(model=BertWithIds(), args=arguments, train_dataset=data, callbacks=list(callbacks),
                              **kwargs)
        trainer.train()
        return trainer

    class Kept:
        """A sink that keeps each group's attribution."""

        def __init__(self) -> None:
            self.samples = []

        def write(self, report) -> None:
            self.samples.append(report.samples)

        def close(self) -> None:
            pass

    plain, monitored, kept = Grads(), Grads(), Kept()
    with_ids(transformers.Trainer, "plain", plain)
    trainer = with_ids(ConflictTrainer, "monitored", monitored, shared="backbone", monitor_options={"sinks": [kept]})
    for got, expected in zip(monitored.grads, plain.grads, strict=True):
        assert all(torch.equal(got[name], expected[name]) for name in expected)
    history = trainer.conflict_monitor.history
    assert [r.strategy for r in history.measured] == ["accumulated"] * 3
    assert [len(s.ids) for s in kept.samples] == [16, 16, 8] and all(s.residual < 1e-5 for s in kept.samples)
    tally = history.samples.pair("cls", "reg")
    assert sorted(tally) == list(range(40)) and all(row["count"] == 1 for row in tally.values())
    pushes = sum(row["push"] for row in tally.values())  # each example's part in its group's 2 G_ab
    assert pushes == pytest.approx(2 * sum(float(s.gram[0, 1]) for s in kept.samples), rel=1e-4)
    # BERT's position embeddings read [1, L] position ids: no example's own rows, left out and named
    assert list(kept.samples[0].omitted) == ["backbone.embeddings.position_embeddings.weight"]


def test_the_gram_is_that_of_the_task_losses(tmp_path):
    """The first step's Gram against T separate autograd.grad calls in float64 on the model as it was."""
    model = BertTwoTasks(dropout=0.0)
    before = copy.deepcopy(model).double()
    trainer = train(Inputs, model, tmp_path, trainer_kwargs={"shared": "backbone"}, max_steps=1)
    report = trainer.conflict_monitor.history.measured[0]
    batch = trainer.seen[0]
    losses = before.task_losses(batch["input_ids"], batch["attention_mask"], batch["label_cls"],
                                batch["label_reg"].double())
    shared = list(before.backbone.parameters())
    rows = []
    for task in ("cls", "reg"):
        grads = torch.autograd.grad(losses[task], shared, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(shared, grads)]))
    J = torch.stack(rows)
    torch.testing.assert_close(report.gram.double(), J @ J.T, rtol=1e-4, atol=1e-8)
    assert report.weights.tolist() == [1.0, 0.5]


def test_figures_join_the_trainers_log_at_its_logging_steps(tmp_path):
    trainer = train(ConflictTrainer, BertTwoTasks(), tmp_path, trainer_kwargs={"shared": "backbone"},
                    max_steps=6, logging_steps=2)
    reports = trainer.conflict_monitor.history.measured
    assert [r.step for r in reports] == [2, 4, 6]  # only the logged steps were measured
    logged = [row for row in trainer.state.log_history if "conflict/cos/cls/reg" in row]
    assert [row["step"] for row in logged] == [2, 4, 6]
    for row, report in zip(logged, reports):
        assert "loss" in row  # the same log call as the training loss of that step
        assert row["conflict/cos/cls/reg"] == pytest.approx(float(report.cosine[0, 1]))
        assert row["conflict/cancellation"] == pytest.approx(float(report.cancellation))
        assert not any(key.startswith("conflict/layer/") for key in row)  # a quiet log by default


def test_layers_true_logs_each_shared_layer(tmp_path):
    trainer = train(ConflictTrainer, BertTwoTasks(), tmp_path, trainer_kwargs={"shared": "backbone", "layers": True},
                    max_steps=2)
    report = trainer.conflict_monitor.history.measured[-1]
    row = [row for row in trainer.state.log_history if "conflict/cos/cls/reg" in row][-1]
    layer = "backbone.encoder.layer.1.output.dense"
    key = f"conflict/layer/{layer}/worst_cosine"
    assert row[key] == pytest.approx(float(report.layers[layer].cosine[0, 1]))
    worst = [k for k in row if k.startswith("conflict/layer/") and k.endswith("/worst_cosine")]
    assert len(worst) == len(report.layers)


def test_a_checkpoint_carries_the_monitor_and_a_resumed_run_goes_on(tmp_path):
    """Checkpoints at steps 1 and 2; a run resumed from step 2 to 4 has the history of all four steps, and its
    steps 3 and 4 measure what an uninterrupted run of four steps measures."""
    from gradconflict.integrations.huggingface import MONITOR_STATE_NAME

    kwargs, constant = {"shared": "backbone"}, {"lr_scheduler_type": "constant", "save_steps": 1}
    whole = train(ConflictTrainer, BertTwoTasks(dropout=0.0), tmp_path / "whole", trainer_kwargs=kwargs, max_steps=4,
                  **constant)
    first = train(ConflictTrainer, BertTwoTasks(dropout=0.0), tmp_path / "run", trainer_kwargs=kwargs, max_steps=2,
                  save_strategy="steps", **constant)
    saved = torch.load(tmp_path / "run" / "checkpoint-2" / MONITOR_STATE_NAME, weights_only=True)
    assert saved["step"] == first.conflict_monitor.state_dict()["step"]
    assert (tmp_path / "run" / "checkpoint-1" / MONITOR_STATE_NAME).is_file()
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, learning_rate=1e-2, report_to="none",
        use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True, logging_steps=1, max_steps=4, **constant,
    )
    resumed = ConflictTrainer(model=BertTwoTasks(dropout=0.0), args=arguments, train_dataset=dataset(), **kwargs)
    resumed.train(resume_from_checkpoint=True)  # the last checkpoint: checkpoint-2
    reports = resumed.conflict_monitor.history.measured
    assert [r.step for r in reports] == [1, 2, 3, 4]
    expected = whole.conflict_monitor.history.measured
    for got, want in zip(reports, expected):
        torch.testing.assert_close(got.gram, want.gram, rtol=1e-4, atol=1e-7)


def test_resuming_from_a_plain_trainers_checkpoint_starts_the_monitor_afresh(tmp_path):
    train(transformers.Trainer, BertTwoTasks(), tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, report_to="none", use_cpu=True, save_strategy="no",
        disable_tqdm=True, logging_steps=1, max_steps=3,
    )
    trainer = ConflictTrainer(model=BertTwoTasks(), args=arguments, train_dataset=dataset(), shared="backbone")
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert [r.step for r in trainer.conflict_monitor.history.measured] == [3]


def test_a_model_without_task_losses_trains_as_usual_and_says_so(tmp_path):
    plain, monitored = Grads(), Grads()
    train(transformers.Trainer, BertTwoTasks(task_losses=False), tmp_path / "plain", plain, max_steps=2)
    with pytest.warns(MeasurementWarning, match="no 'task_losses' field"):
        train(ConflictTrainer, BertTwoTasks(task_losses=False), tmp_path / "monitored", monitored, max_steps=2)
    for got, expected in zip(monitored.grads, plain.grads):
        assert all(torch.equal(got[n], expected[n]) for n in expected)


def _ddp_worker(rank: int, port: int, out: str) -> None:
    """One of 2 CPU processes joined as under torchrun: the Trainer sets up DDP on gloo from the environment, trains
    the plain model then the monitored one, and this process saves the .grad each stepped with, the batches it
    trained on and its reports."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    ddp = {"max_steps": 2, "ddp_backend": "gloo", "per_device_train_batch_size": 4}
    plain, monitored = Grads(), Grads()
    train(transformers.Trainer, BertTwoTasks(dropout=0.0), f"{out}-plain", plain, **ddp)
    trainer = train(Inputs, BertTwoTasks(dropout=0.0), f"{out}-monitored", monitored,
                    trainer_kwargs={"shared": "backbone"}, **ddp)
    reports = trainer.conflict_monitor.history.measured
    saved = {"plain": plain.grads, "monitored": monitored.grads, "seen": trainer.seen, "world": trainer.args.world_size,
             "grams": [r.gram for r in reports], "steps": [r.step for r in reports], "sync": reports[0].sync}
    torch.save(saved, f"{out}-{rank}.pt")


@pytest.mark.slow  # two processes that each import transformers and train twice: about a minute
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available in this build")
def test_ddp_on_two_gloo_processes(tmp_path):
    """Under DDP each rank's .grad equals the plain Trainer's, and each rank reports the same Gram: that of the
    global batch (the mean over the ranks of each task's gradient), against float64 autograd.grad on both ranks'
    batches."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(port, str(tmp_path / "run")), nprocs=2, join=True)
    saved = [torch.load(tmp_path / f"run-{rank}.pt", weights_only=False) for rank in range(2)]
    for rank in saved:
        assert rank["world"] == 2 and rank["sync"] == "exact" and rank["steps"] == [1, 2]
        assert len(rank["monitored"]) == len(rank["plain"]) == 2
        for got, expected in zip(rank["monitored"], rank["plain"]):
            assert got.keys() == expected.keys() and all(torch.equal(got[n], expected[n]) for n in expected)
    torch.testing.assert_close(saved[0]["grams"][0], saved[1]["grams"][0], rtol=0, atol=0)
    model = BertTwoTasks(dropout=0.0).double()  # the first step's model: the same seed on every rank
    shared = list(model.backbone.parameters())
    per_rank = []
    for rank in saved:
        batch = rank["seen"][0]
        losses = model.task_losses(batch["input_ids"], batch["attention_mask"], batch["label_cls"],
                                   batch["label_reg"].double())
        rows = []
        for task in ("cls", "reg"):
            grads = torch.autograd.grad(losses[task], shared, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(shared, grads)]))
        per_rank.append(torch.stack(rows))
    J = (per_rank[0] + per_rank[1]) / 2
    assert not torch.equal(saved[0]["seen"][0]["input_ids"], saved[1]["seen"][0]["input_ids"])
    torch.testing.assert_close(saved[0]["grams"][0].double(), J @ J.T, rtol=1e-4, atol=1e-8)
