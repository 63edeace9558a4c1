from __future__ import annotations

import pytest
import torch

from gradconflict import ConflictReport, LayerReport


def gram(cos, norms=None):
    """A Gram with the given cosine matrix (nested lists) and task norms."""
    C = torch.tensor(cos, dtype=torch.float64)
    n = torch.ones(C.shape[0], dtype=torch.float64) if norms is None else torch.tensor(norms, dtype=torch.float64)
    return n[:, None] * C * n[None, :]


def pair(c, norms=(1.0, 1.0)):
    return gram([[1.0, c], [c, 1.0]], norms)


def report(G, step=0, tasks=None, layers=None, losses=None):
    tasks = tasks or "abcdefghijklmnop"[: G.shape[0]]
    layer_reports = {name: LayerReport(name, tasks, g, num_params=n) for name, (g, n) in (layers or {}).items()}
    L = torch.ones(G.shape[0], dtype=torch.float64) if losses is None else torch.tensor(losses, dtype=torch.float64)
    return ConflictReport(tasks, G, losses=L, layers=layer_reports, step=step)


def cut(names, G, step=0, tasks="abcd", layers=None, losses=None):
    """A report carrying only ``names``, in that order (as a losses dict would list them), cut from Grams built
    for every task in ``tasks`` order: ``G`` and each layer's ``(G, num_params)``; ``losses`` per task of ``tasks``."""
    names = tuple(names)
    index = torch.tensor([list(tasks).index(n) for n in names])

    def sub(M):
        return M[index][:, index]

    layer_reports = {name: LayerReport(name, names, sub(g), num_params=n) for name, (g, n) in (layers or {}).items()}
    L = None if losses is None else torch.tensor(losses, dtype=torch.float64)[index]
    return ConflictReport(names, sub(G), losses=L, layers=layer_reports, step=step)


@pytest.fixture(autouse=True)
def one_thread():
    # These tests run thousands of tiny ops: on a busy 2-core machine intra-op threads only add contention
    # (measured: 80 monitored steps in 1.8 s on one thread against 5-10 s on two).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_report():
    return report


@pytest.fixture
def make_pair():
    return pair


@pytest.fixture
def make_gram():
    return gram


@pytest.fixture
def make_cut():
    return cut
