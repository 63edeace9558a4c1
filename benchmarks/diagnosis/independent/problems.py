"""The independent benchmark's problems: real bundled data, MLP, conv and transformer backbones, learnable heads.

Built differently from :data:`gradconflict.fixtures.synthetic.FAMILY` (synthetic sines through one frozen readout
on a tanh MLP): the inputs are scikit-learn's bundled digits (8 x 8 images) and breast-cancer features (nothing is
downloaded); the tasks are labellings of them (the digit's class, its parity, whether it is 5 or more, whether it
has a closed loop, its ink and centre of mass), with label noise where stated; the backbones are an MLP, a small
conv net and a small transformer encoder over the image's rows; the heads learn (one problem only uses a frozen
shared readout, to make two pairs of tasks truly opposed). What can make a split pay here is what makes it pay in
practice: a backbone too narrow for every task at once, tasks on disjoint inputs, a loss that drowns another,
tasks that agree first and compete later. Nothing here is tuned to the library's thresholds; each problem's
answer is measured by :mod:`.truth`, and ``construction`` only records what it was built to show.

Every backbone is an ``nn.Sequential`` of four blocks (``backbone.0`` .. ``backbone.3``), so that ``branch`` can
branch at each of them and the advice's layer names map to a block by their first two path components.
"""

from __future__ import annotations

import functools
import hashlib
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradconflict.split import MultiTaskNet

#: Size of the held-out part of each data set (the rest trains).
TEST_DIGITS, TEST_BREAST = 597, 169
#: Every problem's training budget (Adam steps of 64 examples). Short, to fit the whole truth in a few CPU minutes
#: on a shared machine: at this budget the models are not trained to convergence (see DIAGNOSIS.md).
STEPS = 300


@dataclass(frozen=True)
class Task:
    """One task: what it predicts, how it is scored, the scale of its training loss.

    Attributes:
        name: the task's name.
        kind: ``"class"`` (cross-entropy, scored by held-out accuracy) or ``"reg"`` (mean squared error, scored
            by held-out mean squared error).
        classes: number of classes (``"class"``) or 1.
        scale: the training loss is multiplied by it (magnitude dominance).
    """

    name: str
    kind: str
    classes: int = 1
    scale: float = 1.0


@dataclass
class Problem:
    """A multi-task problem: data, a model factory, each task's loss and metric, the training budget.

    Attributes:
        name: a short name.
        construction: what the problem was built to show (and the answer it was built for); the truth is measured.
        expected: the answer the construction calls for: ``(verdict, branch block or None, groups)``.
        tasks: the :class:`Task` s.
        x, y: training inputs and ``{task: targets}``.
        x_test, y_test: held-out inputs and targets.
        build: ``build(generator) -> model`` (``generator=None``: torch's global generator).
        steps, batch, lr: the training budget (Adam).
    """

    name: str
    construction: str
    expected: tuple[str, str | None, list[list[str]]]
    tasks: list[Task]
    x: Tensor
    y: dict[str, Tensor]
    x_test: Tensor
    y_test: dict[str, Tensor]
    build: Callable[[torch.Generator | None], nn.Module]
    steps: int = STEPS
    batch: int = 64
    lr: float = 3e-3
    backbone: str = "mlp"
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def model(self, seed: int) -> nn.Module:
        """The untrained model of ``seed`` (the same weights whatever the global RNG state)."""
        return self.build(torch.Generator().manual_seed(10_000 + seed))

    def loss_fns(self) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
        """``{task: (output, target) -> training loss}`` (scaled where the task says so)."""
        return {t.name: functools.partial(_loss, t.kind, t.scale) for t in self.tasks}

    def metrics(self) -> dict[str, tuple[Callable[[Tensor, Tensor], float], str]]:
        """``{task: (fn, "max" | "min")}``: held-out accuracy or mean squared error (the user's score, unscaled)."""
        return {t.name: (_accuracy, "max") if t.kind == "class" else (_mse, "min") for t in self.tasks}

    def batch_indices(self, seed: int) -> list[Tensor]:
        """The ``steps`` minibatches (index tensors into the training set) of ``seed``: epochs of a seeded
        permutation, the same for every variant trained with that seed."""
        gen = torch.Generator().manual_seed(1000 + seed)
        n, out = self.x.shape[0], []
        while len(out) < self.steps:
            order = torch.randperm(n, generator=gen)
            out += [order[s : s + self.batch] for s in range(0, n - self.batch + 1, self.batch)]
        return out[: self.steps]

    def fingerprint(self) -> str:
        """A digest of everything the truth depends on (data, budget, a fresh model's weights and structure): a
        cached truth with another fingerprint is stale."""
        h = hashlib.sha256()
        model = self.model(0)
        h.update(json.dumps([self.name, [t.__dict__ for t in self.tasks], self.steps, self.batch, self.lr]).encode())
        h.update(repr(model).encode())
        for tensor in (self.x, self.x_test, *self.y.values(), *self.y_test.values(), *model.state_dict().values()):
            h.update(tensor.detach().double().numpy().tobytes())
        return h.hexdigest()[:16]


def _loss(kind: str, scale: float, out: Tensor, target: Tensor) -> Tensor:
    loss = F.cross_entropy(out, target) if kind == "class" else F.mse_loss(out.squeeze(-1), target)
    return scale * loss if scale != 1.0 else loss


def _accuracy(out: Tensor, target: Tensor) -> float:
    return float((out.argmax(-1) == target).float().mean())


def _mse(out: Tensor, target: Tensor) -> float:
    return float(F.mse_loss(out.squeeze(-1), target))


# ------------------------------------------------------------------------------------------------------ data


@functools.cache
def _digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = torch.randperm(len(d.target), generator=torch.Generator().manual_seed(0))
    return torch.tensor(d.images, dtype=torch.float32)[perm] / 16.0, torch.tensor(d.target)[perm]


@functools.cache
def _breast() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    perm = torch.randperm(len(d.target), generator=torch.Generator().manual_seed(0))
    x = torch.tensor(d.data, dtype=torch.float32)[perm]
    train = x[:-TEST_BREAST]
    x = (x - train.mean(0)) / train.std(0)  # standardised on the training part
    return x, torch.tensor(d.target)[perm]


def _noisy(labels: Tensor, classes: int, rate: float, seed: int) -> Tensor:
    """``labels`` with a share ``rate`` replaced by a uniformly drawn other class (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    flip = torch.rand(labels.shape, generator=gen) < rate
    other = (labels + torch.randint(1, classes, labels.shape, generator=gen)) % classes
    return torch.where(flip, other, labels)


def _standard(v: Tensor) -> Tensor:
    return (v - v.mean()) / v.std()


def digit_labels(images: Tensor, digits: Tensor) -> dict[str, Tensor]:
    """Every labelling of the digits the problems use."""
    cols = torch.arange(8.0)
    ink = images.sum((-1, -2))
    com_x = (images.sum(-2) * cols).sum(-1) / ink
    com_y = (images.sum(-1) * cols).sum(-1) / ink
    return {
        "class": digits,
        "parity": digits % 2,
        "big": (digits >= 5).long(),
        "loop": torch.isin(digits, torch.tensor([0, 6, 8, 9])).long(),
        "mod3": digits % 3,
        "ink": _standard(ink),
        "com_x": _standard(com_x),
        "com_y": _standard(com_y),
        "neg_ink": -_standard(ink),
        "ink+com_x": _standard(ink) + 0.6 * _standard(com_x),
        "ink-com_x": _standard(ink) - 0.6 * _standard(com_x),
    }


def _split(x: Tensor, ys: dict[str, Tensor], n_test: int) -> tuple[Tensor, dict, Tensor, dict]:
    return x[:-n_test], {k: v[:-n_test] for k, v in ys.items()}, x[-n_test:], {k: v[-n_test:] for k, v in ys.items()}


# ---------------------------------------------------------------------------------------------------- models


class Rows(nn.Module):
    """Transformer input block: each image row (8 pixels) a token, embedded, plus a learned position."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.position = nn.Parameter(torch.zeros(8, d))

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(x.reshape(x.shape[0], 8, 8)) + self.position


class Encoder(nn.Module):
    """A pre-norm transformer encoder layer from plain ``nn.Linear`` s (so per-task LoRA can adapt it)."""

    def __init__(self, d: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h: Tensor) -> Tensor:
        b, n, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        h = h + self.out(attended)
        return h + self.down(F.gelu(self.up(self.norm2(h))))


class Pool(nn.Module):
    """Mean over the tokens."""

    def forward(self, h: Tensor) -> Tensor:
        return h.mean(1)


def mlp(d_in: int, widths: tuple[int, ...]) -> nn.Sequential:
    """Four ``Linear`` + ``ReLU`` blocks (the last width is the feature the heads read)."""
    sizes = (d_in, *widths)
    return nn.Sequential(*[nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(sizes, sizes[1:])])


def conv(channels: tuple[int, int], hidden: int, width: int) -> nn.Sequential:
    """conv 3x3 | conv 3x3 + 2x2 max-pool | linear | linear, on 1 x 8 x 8 digits."""
    c1, c2 = channels
    return nn.Sequential(
        nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, c1, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Flatten(), nn.Linear(c2 * 16, hidden), nn.ReLU()),
        nn.Sequential(nn.Linear(hidden, width), nn.ReLU()),
    )


def transformer(d: int, width: int) -> nn.Sequential:
    """rows embedding | encoder layer | encoder layer | mean pool + linear, on 8 x 8 digits (8 tokens)."""
    return nn.Sequential(Rows(d), Encoder(d), Encoder(d), nn.Sequential(Pool(), nn.Linear(d, width), nn.ReLU()))


class Frozen(nn.Module):
    """A frozen linear readout ``r . h`` (a head that cannot learn), output ``[batch, 1]``."""

    def __init__(self, vector: Tensor) -> None:
        super().__init__()
        self.register_buffer("vector", vector)

    def forward(self, h: Tensor) -> Tensor:
        return (h @ self.vector).unsqueeze(-1)


def _init(model: nn.Module, generator: torch.Generator | None) -> nn.Module:
    """Re-draw every weight from ``generator`` (PyTorch's default ranges), so the seed alone fixes the model."""
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if name == "position":
                    p.normal_(0.0, 0.1, generator=generator)
                elif p.dim() == 1:
                    if isinstance(module, nn.LayerNorm):
                        p.fill_(1.0 if name == "weight" else 0.0)
                    else:
                        p.uniform_(-0.05, 0.05, generator=generator)
                else:
                    bound = (1.0 / (p[0].numel())) ** 0.5
                    p.uniform_(-bound, bound, generator=generator)
    return model


def _builder(
    make_backbone: Callable[[], nn.Sequential], width: int, tasks: list[Task], head_init: str = "free",
) -> Callable[[torch.Generator | None], nn.Module]:
    """``generator -> MultiTaskNet``: the backbone, one learnable linear head per task (``head_init="mirror"``:
    the second head starts as the negated first), or one frozen shared readout (``"frozen"``)."""

    def build(generator: torch.Generator | None) -> nn.Module:
        if head_init == "frozen":
            r = torch.randn(width, generator=generator)
            heads: dict[str, nn.Module] = {t.name: Frozen(2.0 * r / r.norm()) for t in tasks}
        else:
            heads = {t.name: nn.Linear(width, t.classes) for t in tasks}
        model = _init(MultiTaskNet(make_backbone(), heads), generator)
        if head_init == "mirror":
            first, second = (model.heads[t.name] for t in tasks[:2])
            with torch.no_grad():
                second.weight.copy_(-first.weight)
                second.bias.copy_(-first.bias)
        return model

    return build


# -------------------------------------------------------------------------------------------------- problems


def digit_problem(
    name: str, construction: str, expected: tuple[str, str | None, list[list[str]]],
    tasks: list[tuple[Task, str, float]], backbone: str, make_backbone: Callable[[], nn.Sequential], width: int,
    head_init: str = "free", steps: int = STEPS, lr: float = 3e-3,
) -> Problem:
    """A digits problem: each task ``(Task, labelling, label-noise rate)`` (noise on the training labels and on
    the held-out ones alike: the user only ever sees noisy labels)."""
    images, digits = _digits()
    labels = digit_labels(images, digits)
    ys = {}
    for k, (task, source, noise) in enumerate(tasks):
        y = labels[source]
        if noise:
            y = _noisy(y, task.classes, noise, seed=zlib.crc32(name.encode()) % 1000 + k) if task.kind == "class" else (
                y + noise * torch.randn(y.shape, generator=torch.Generator().manual_seed(k + 7)))
        ys[task.name] = y
    x = images.reshape(len(images), 64)
    x_tr, y_tr, x_te, y_te = _split(x, ys, TEST_DIGITS)
    plain = [t for t, _, _ in tasks]
    return Problem(
        name, construction, expected, plain, x_tr, y_tr, x_te, y_te,
        _builder(make_backbone, width, plain, head_init), steps=steps, lr=lr, backbone=backbone,
    )


def _c(name: str, classes: int, scale: float = 1.0) -> Task:
    return Task(name, "class", classes, scale)


def _r(name: str, scale: float = 1.0) -> Task:
    return Task(name, "reg", 1, scale)


KEEP, LORA, PHYS = "keep_shared", "lora_split", "physical_split"


def _disjoint(name: str) -> Problem:
    """Digits and breast-cancer records side by side in one input, one task on each half."""
    images, digits = _digits()
    bx, by = _breast()
    gen = torch.Generator().manual_seed(3)
    n_tr, n_te = len(digits) - TEST_DIGITS, TEST_DIGITS
    pick_tr = torch.randint(len(by) - TEST_BREAST, (n_tr,), generator=gen)
    pick_te = len(by) - TEST_BREAST + torch.randint(TEST_BREAST, (n_te,), generator=gen)
    pick = torch.cat([pick_tr, pick_te])
    x = torch.cat([images.reshape(len(images), 64), bx[pick]], 1)
    ys = {"digit": digits, "tumour": by[pick]}
    tasks = [_c("digit", 10), _c("tumour", 2)]
    x_tr, y_tr, x_te, y_te = _split(x, ys, TEST_DIGITS)
    return Problem(
        name, "a digit and a breast-cancer record side by side; one task reads each: orthogonal gradients, and a "
        "backbone too narrow (6 features) for both", (PHYS, "backbone.0", [["digit"], ["tumour"]]), tasks,
        x_tr, y_tr, x_te, y_te, _builder(lambda: mlp(94, (32, 16, 6, 6)), 6, tasks), backbone="mlp",
    )


def _breast_noisy(name: str) -> Problem:
    bx, by = _breast()
    noisy = _noisy(by, 2, 0.3, seed=11)
    ys = {"diagnosis": by, "noisy": noisy}
    tasks = [_c("diagnosis", 2), _c("noisy", 2)]
    x_tr, y_tr, x_te, y_te = _split(bx, ys, TEST_BREAST)
    return Problem(
        name, "breast-cancer diagnosis, and the same diagnosis with 30% of its labels flipped: the data is the "
        "limit, sharing pools it", (KEEP, None, [["diagnosis", "noisy"]]), tasks, x_tr, y_tr, x_te, y_te,
        _builder(lambda: mlp(30, (32, 32, 16, 16)), 16, tasks), backbone="mlp",
    )


def problems() -> list[Problem]:
    """Every problem of the independent benchmark, built on demand (the data sets load once)."""
    wide = functools.partial(mlp, 64)
    return [
        # --- compatible controls: keep shared
        digit_problem(
            "mlp-compatible-3", "class, parity and 5-or-more of a digit: all read off its identity by a wide MLP",
            (KEEP, None, [["big", "class", "parity"]]),
            [(_c("class", 10), "class", 0), (_c("parity", 2), "parity", 0), (_c("big", 2), "big", 0)],
            "mlp", lambda: wide((64, 64, 64, 32)), 32,
        ),
        digit_problem(
            "conv-compatible-2", "class and closed-loop of a digit through a conv net with room for both",
            (KEEP, None, [["class", "loop"]]), [(_c("class", 10), "class", 0), (_c("loop", 2), "loop", 0)],
            "conv", lambda: conv((8, 16), 64, 32), 32,
        ),
        digit_problem(
            "transformer-compatible-2", "class and parity of a digit through a small transformer over its rows",
            (KEEP, None, [["class", "parity"]]), [(_c("class", 10), "class", 0), (_c("parity", 2), "parity", 0)],
            "transformer", lambda: transformer(16, 16), 16,
        ),
        # --- label noise: the data is the limit
        _breast_noisy("breast-noisy-2"),
        # --- transient conflict: the heads start opposed, then agree (same labels)
        digit_problem(
            "mlp-transient-2", "the class of a digit twice (the second with 10% label noise), the second head "
            "starting as the negated first: the gradients fight until the heads agree", (KEEP, None, [["a", "b"]]),
            [(_c("a", 10), "class", 0), (_c("b", 10), "class", 0.1)],
            "mlp", lambda: wide((32, 32, 32, 16)), 16, head_init="mirror",
        ),
        # --- magnitude dominance: aligned tasks, one loss scaled 100x
        digit_problem(
            "mlp-magnitude-100x", "5-or-more (loss x100) and the class of a digit, related tasks through a "
            "12-feature MLP: the scaled task takes the features", (PHYS, "backbone.3", [["big"], ["class"]]),
            [(_c("big", 2, scale=100.0), "big", 0), (_c("class", 10), "class", 0)],
            "mlp", lambda: wide((32, 32, 12, 12)), 12,
        ),
        # --- capacity limits
        _disjoint("disjoint-inputs-2"),
        digit_problem(
            "conv-too-narrow-2", "the class of a digit and its residue mod 3 through a 2-channel conv net with a "
            "3-feature top: no room for both", (PHYS, "backbone.0", [["class"], ["mod3"]]),
            [(_c("class", 10), "class", 0), (_c("mod3", 3), "mod3", 0)],
            "conv", lambda: conv((2, 2), 8, 3), 3,
        ),
        # --- group structure through a narrow top block (3-4 tasks)
        digit_problem(
            "mlp-two-pairs-4", "parity twice and 5-or-more twice (one of each with 10% label noise) through a "
            "2-feature top block: two pairs compete for it", (PHYS, "backbone.3", [["big", "big2"], ["par", "par2"]]),
            [(_c("par", 2), "parity", 0), (_c("par2", 2), "parity", 0.1), (_c("big", 2), "big", 0),
             (_c("big2", 2), "big", 0.1)],
            "mlp", lambda: wide((64, 32, 32, 2)), 2,
        ),
        digit_problem(
            "transformer-triple-single-4", "parity three times (0%, 10%, 20% label noise) and the closed loop, "
            "through a transformer with a 2-feature top: a triple and a single",
            (PHYS, "backbone.3", [["p0", "p1", "p2"], ["loop"]]),
            [(_c("p0", 2), "parity", 0), (_c("p1", 2), "parity", 0.1), (_c("p2", 2), "parity", 0.2),
             (_c("loop", 2), "loop", 0)],
            "transformer", lambda: transformer(16, 2), 2,
        ),
        digit_problem(
            "conv-pair-single-3", "closed loop twice (0% and 15% label noise) and 5-or-more through a conv net "
            "with a 1-feature top: a pair and a single", (PHYS, "backbone.3", [["big"], ["loop", "loop2"]]),
            [(_c("loop", 2), "loop", 0), (_c("loop2", 2), "loop", 0.15), (_c("big", 2), "big", 0)],
            "conv", lambda: conv((8, 16), 32, 1), 1,
        ),
        digit_problem(
            "conv-opposed-pairs-4", "ink twice and negated ink twice (regressions with label noise 0.3) through one "
            "frozen readout: two opposed pairs", (PHYS, "backbone.0", [["a", "b"], ["c", "d"]]),
            [(_r("a"), "ink", 0.3), (_r("b"), "ink", 0.3), (_r("c"), "neg_ink", 0.3), (_r("d"), "neg_ink", 0.3)],
            "conv", lambda: conv((8, 16), 32, 16), 16, head_init="frozen",
        ),
        # --- late conflict: agree on a large common part first, then compete for the rest
        digit_problem(
            "mlp-late-conflict-2", "ink + 0.6 x horizontal centre of mass and ink - 0.6 x it (regressions) through "
            "a 1-feature top: both fit the ink first, then pull apart", (PHYS, "backbone.3", [["a"], ["b"]]),
            [(_r("a"), "ink+com_x", 0), (_r("b"), "ink-com_x", 0)],
            "mlp", lambda: wide((64, 32, 16, 1)), 1,
        ),
    ]

