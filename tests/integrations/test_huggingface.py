"""Hugging Face Trainer: a tiny BERT built from a config, two tasks. A monitored run leaves .grad exactly as the
plain Trainer does (plain, accumulation with a short last group, bf16), measures the Gram of the task losses the
model returns, adds the figures to the Trainer's log at its logging steps and closes the monitor when train()
ends."""

from __future__ import annotations

import copy

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
    args = {"logging_steps": 1, **args}
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=1e-2, report_to="none",
        use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True, **args,
    )
    trainer = trainer_cls(model=model, args=arguments, train_dataset=dataset(), callbacks=list(callbacks),
                          **(trainer_kwargs or {}))
    trainer.train()
    return trainer


SETUPS = {
    "plain": {"max_steps": 4},
    "accumulation": {"num_train_epochs": 1, "gradient_accumulation_steps": 2},  # 5 batches: 2, 2 and a short 1
    "bf16": {"max_steps": 3, "bf16": True},
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
        assert "conflict/layer/backbone.encoder.layer.1.output.dense/worst_cosine" in row


def test_a_model_without_task_losses_trains_as_usual_and_says_so(tmp_path):
    plain, monitored = Grads(), Grads()
    train(transformers.Trainer, BertTwoTasks(task_losses=False), tmp_path / "plain", plain, max_steps=2)
    with pytest.warns(MeasurementWarning, match="no 'task_losses' field"):
        train(ConflictTrainer, BertTwoTasks(task_losses=False), tmp_path / "monitored", monitored, max_steps=2)
    for got, expected in zip(monitored.grads, plain.grads):
        assert all(torch.equal(got[n], expected[n]) for n in expected)
