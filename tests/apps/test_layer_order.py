"""A saved run keeps the model's layer order: the command line, ``advise(history)`` without a model and the HTML
report give the branch point, the duplicated share and the layer order that ``monitor.advise()`` gives.

The backbone's layers are named against their depth (``z_in`` at the bottom, then ``p_low``, ``c_mid``,
``a_top``: alphabetical order is the reverse), and the tasks conflict by construction on the two middle layers
only. The network is linear and each task's loss linear in its output, so each layer's task gradients are fixed
by the weights: with heads ``r_a = e1`` and ``r_b = e1 + e2``, the gradient reaching a layer's output is
``W_above^T ... r``, and a layer's Gram over its weight and bias is ``(delta_a . delta_b) (|mean input|^2 + 1)``:
its cosine is ``cos(delta_a, delta_b)``, whatever the batch. The rows set below give (bottom to top) cosines of
``2 / sqrt(4.25)``, ``-1 / sqrt(2)``, ``-1 / sqrt(2)`` and ``1 / sqrt(2)`` before the first update; the few small
steps trained move them, not their signs.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from gradconflict import ConflictMonitor, History, JSONLSink
from gradconflict.apps.cli import main
from gradconflict.diagnosis import advise
from gradconflict.split import MultiTaskNet

#: The backbone, bottom to top: layer name -> (inputs, outputs).
WIDTHS = OrderedDict(z_in=(3, 4), p_low=(4, 5), c_mid=(5, 6), a_top=(6, 4))
#: Each layer's cosine between the two tasks' gradients, by construction (see the module docstring).
COSINES = {"z_in": 2 / math.sqrt(4.25), "p_low": -1 / math.sqrt(2), "c_mid": -1 / math.sqrt(2),
           "a_top": 1 / math.sqrt(2)}
#: The tasks conflict on p_low and c_mid; the layer above them agrees, so the branch point is the lowest of them.
BRANCH = "p_low"


def _parameters(names):
    return sum((i + 1) * o for n, (i, o) in WIDTHS.items() if n in names)


def _backbone() -> nn.Sequential:
    g = torch.Generator().manual_seed(0)
    backbone = nn.Sequential(OrderedDict((n, nn.Linear(i, o)) for n, (i, o) in WIDTHS.items()))
    with torch.no_grad():
        for layer in backbone:
            layer.weight.copy_(0.3 * torch.randn(layer.weight.shape, generator=g))
        # Only rows 0 and 1 carry the tasks' gradients down (each delta lies in the span of e1 and e2).
        top, mid, low = backbone.a_top.weight, backbone.c_mid.weight, backbone.p_low.weight
        top[0], top[1] = torch.eye(6)[0], -2 * torch.eye(6)[0] + torch.eye(6)[1]  # delta: e1 and -e1 + e2
        mid[0], mid[1] = torch.eye(5)[0], torch.eye(5)[1]  # delta: e1 and -e1 + e2 again
        low[0], low[1] = torch.eye(4)[0], 3 * torch.eye(4)[0] + 0.5 * torch.eye(4)[1]  # e1 and 2 e1 + 0.5 e2
    return backbone


def _heads() -> dict[str, nn.Module]:
    heads = {}
    for task, readout in (("a", [1.0, 0.0, 0.0, 0.0]), ("b", [1.0, 1.0, 0.0, 0.0])):
        head = nn.Linear(4, 1, bias=False)
        head.weight.data.copy_(torch.tensor([readout]))
        head.weight.requires_grad_(False)
        heads[task] = head
    return heads


def _train(kind: str, path) -> tuple[ConflictMonitor, str]:
    """40 monitored SGD steps, saved by a JSONLSink; the monitor and the backbone's path in the model."""
    backbone, heads = _backbone(), _heads()
    if kind == "convention":  # .backbone and .heads: the advice counts the blocks branch() would copy
        model, prefix = MultiTaskNet(backbone, heads), "backbone"
    else:  # another layout: the advice counts the profiled layers
        model, prefix = nn.ModuleDict({"trunk": backbone, "towers": nn.ModuleDict(heads)}), "trunk"
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(1)
    monitor = ConflictMonitor(model, sinks=[JSONLSink(path)])
    for _ in range(40):
        h = backbone(torch.randn(16, 3, generator=g))
        optimizer.zero_grad()
        monitor.backward({task: head(h).mean() for task, head in heads.items()})
        optimizer.step()
    monitor.close()
    return monitor, prefix


@pytest.mark.parametrize("kind", ["convention", "other"])
def test_a_saved_run_gives_the_monitors_branch_point_share_and_layer_order(kind, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    path = tmp_path / "run.jsonl"
    monitor, prefix = _train(kind, path)
    order = [f"{prefix}.{n}" for n in WIDTHS]  # the order the backbone was built in
    branch = f"{prefix}.{BRANCH}"
    share = _parameters(list(WIDTHS)[list(WIDTHS).index(BRANCH):]) / _parameters(WIDTHS)

    # The premise: on the first step (before any update) each layer's cosine is the construction's.
    first = monitor.history[0]
    for name in WIDTHS:
        assert float(first.layers[f"{prefix}.{name}"].cosine[0, 1]) == pytest.approx(COSINES[name], rel=1e-5), name

    live = monitor.advise()
    assert [lp.name for lp in live.profile.layers] == order
    assert (live.verdict, live.branch_point) == ("physical_split", branch)
    assert live.duplicated_share == pytest.approx(share)

    saved = advise(History.from_jsonl(path))  # no model
    assert [lp.name for lp in saved.profile.layers] == order
    assert (saved.verdict, saved.branch_point, saved.duplicated_share) == (
        live.verdict, live.branch_point, pytest.approx(live.duplicated_share)
    )

    capsys.readouterr()
    assert main(["advise", str(path), "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert [layer["name"] for layer in cli["profile"]["layers"]] == order
    assert (cli["verdict"], cli["branch_point"], cli["duplicated_share"]) == (
        "physical_split", branch, pytest.approx(share)
    )

    # The HTML report (`gradconflict report -o`): the advice, the summary and the figures it is drawn from.
    from gradconflict.reporting import html

    prepared, prepare = [], html._prepare
    monkeypatch.setattr(html, "_prepare", lambda *args: prepared.append(prepare(*args)) or prepared[-1])
    assert main(["report", str(path), "-o", str(tmp_path / "report.html")]) == 0
    ((advice, summary, figures),) = prepared
    assert [lp.name for lp in advice.profile.layers] == order  # the layer profile table
    assert [lp.name for lp in summary.profile.layers] == order
    assert (advice.branch_point, advice.duplicated_share) == (branch, pytest.approx(share))
    for name in ("layers", "profile"):  # bottom of the network at the bottom: tick 0 is the lowest layer
        ax = figures[name].axes[0]
        ticks = sorted(zip(ax.get_yticks(), (t.get_text() for t in ax.get_yticklabels())))
        assert [text for _, text in ticks] == order, name
