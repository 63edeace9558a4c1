"""Hugging Face Trainer: train a two-task model on a small BERT (built from a config: nothing is downloaded) with
``ConflictTrainer``, and read the conflict figures in the Trainer's own log.

The model's forward returns its total ``loss``, as any model trained by the Trainer does, plus ``task_losses``.
``ConflictTrainer`` takes the same arguments as ``Trainer`` and ``shared="backbone"``: it measures the steps the
Trainer logs (``logging_steps=5``) and adds their figures to those log entries, where every reporting
integration (``report_to="tensorboard"``, ``"wandb"``, ...) picks them up. The script prints the entries of
steps 5, 10, 15 and 20, then the diagnosis of the run.

Run: python examples/huggingface_trainer.py   (pip install "gradconflict[transformers]"; under a minute on a CPU)
"""

import tempfile

import torch
import transformers
from torch import nn

from gradconflict.integrations.huggingface import ConflictTrainer


class TwoTaskBert(nn.Module):
    def __init__(self):
        super().__init__()
        config = transformers.BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=32,
        )
        self.backbone = transformers.BertModel(config, add_pooling_layer=False)
        self.heads = nn.ModuleDict({"parity": nn.Linear(32, 2), "share": nn.Linear(32, 1)})

    def forward(self, input_ids, attention_mask, parity, share):
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        losses = {
            "parity": nn.functional.cross_entropy(self.heads["parity"](h), parity),
            "share": nn.functional.mse_loss(self.heads["share"](h).squeeze(-1), share),
        }
        return {"loss": losses["parity"] + losses["share"], "task_losses": losses}


torch.manual_seed(0)
ids = torch.randint(1, 50, (640, 12))
dataset = [
    {"input_ids": row, "attention_mask": torch.ones_like(row), "parity": row[1] % 2, "share": (row < 25).float().mean()}
    for row in ids
]
with tempfile.TemporaryDirectory() as output_dir:
    args = transformers.TrainingArguments(
        output_dir=output_dir, max_steps=20, per_device_train_batch_size=32, learning_rate=1e-3,
        logging_steps=5, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = ConflictTrainer(model=TwoTaskBert(), args=args, train_dataset=dataset, shared="backbone")
    trainer.train()

logged = [row for row in trainer.state.log_history if "conflict/cos/parity/share" in row]
for row in logged:
    print(f"step {row['step']:>2}: loss {row['loss']:.3f}, cos(parity, share) {row['conflict/cos/parity/share']:+.3f}, "
          f"cancellation {row['conflict/cancellation']:.3f}")
advice = trainer.conflict_monitor.advise()
print(f"\nadvice: {advice.verdict} ({advice.reason})")
assert [row["step"] for row in logged] == [5, 10, 15, 20] and trainer.conflict_monitor.closed
