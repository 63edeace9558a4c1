"""PyTorch Lightning: add the monitor to a two-task LightningModule in three changes, and find the conflict
figures in the trainer's logger.

The three changes (marked ``# gradconflict`` below): ``ConflictMonitorMixin`` first among the module's bases,
``training_step`` returning its task losses next to the total, and a ``ConflictCallback`` on the trainer. With
``log_every_n_steps=10`` the callback measures exactly the steps Lightning logs (every 10th; the others cost
nothing) and logs them with ``self.log``, so they reach every logger the trainer has: here a ``CSVLogger``, whose
``metrics.csv`` the script reads back to show the pairwise cosine and the cancellation at steps 9, 19, 29, 39.
The logs go to the folder ``--out`` names, or to a temporary one that is removed at the end.

Run: python examples/lightning_two_tasks.py [--out DIR]   (pip install "gradconflict[lightning]"; a few seconds on
a CPU)
"""

import argparse
import csv
import tempfile
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradconflict.integrations.lightning import ConflictCallback, ConflictMonitorMixin


class TwoTasks(ConflictMonitorMixin, pl.LightningModule):  # gradconflict: the mixin first
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
        self.heads = nn.ModuleDict({"sum": nn.Linear(32, 1), "sign": nn.Linear(32, 1)})

    def training_step(self, batch, batch_idx):
        x, y_sum, y_sign = batch
        h = self.backbone(x)
        losses = {
            "sum": nn.functional.mse_loss(self.heads["sum"](h), y_sum),
            "sign": nn.functional.binary_cross_entropy_with_logits(self.heads["sign"](h), y_sign),
        }
        return {"loss": losses["sum"] + losses["sign"], "task_losses": losses}  # gradconflict: the task losses

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default=None, help="folder for the trainer's logs (default: a temporary one)")
args, _ = parser.parse_known_args()

torch.manual_seed(0)
x = torch.randn(1280, 8)
data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True), (x[:, :1] > 0).float()), batch_size=32)
callback = ConflictCallback(shared="backbone")  # gradconflict: the callback
with tempfile.TemporaryDirectory() as scratch:
    out = args.out or scratch
    trainer = pl.Trainer(
        max_steps=40, log_every_n_steps=10, callbacks=[callback], logger=CSVLogger(out, name="two-tasks"),
        default_root_dir=out, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(TwoTasks(), data)
    with open(f"{trainer.logger.log_dir}/metrics.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("conflict/cos/sign/sum")]
for row in rows:
    print(f"step {row['step']:>2}: cos(sign, sum) {float(row['conflict/cos/sign/sum']):+.3f}, "
          f"cancellation {float(row['conflict/cancellation']):.3f}")
print("measured steps:", [r.step for r in callback.monitor.history.measured], "closed:", callback.monitor.closed)
assert [int(row["step"]) for row in rows] == [9, 19, 29, 39] and callback.monitor.closed
