"""``ConflictMonitor``: attach to a multi-task model, replace ``loss.backward()``, get a report per step.

>>> import torch, torch.nn as nn
>>> torch.manual_seed(0) and None
>>> backbone = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
>>> heads = nn.ModuleDict({"a": nn.Linear(8, 1), "b": nn.Linear(8, 1)})
>>> model = nn.ModuleDict({"backbone": backbone, "heads": heads})
>>> monitor = ConflictMonitor(model)
>>> h = backbone(torch.randn(16, 4))
>>> report = monitor.backward({"a": heads["a"](h).pow(2).mean(), "b": heads["b"](h).mean()})
>>> report.tasks, tuple(report.gram.shape), sorted(report.layers)
(('a', 'b'), (2, 2), ['backbone.0'])
>>> monitor.close()
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from gradconflict.capture import Capture, OutputCapture, depends_on, leaves_of
from gradconflict.engine import Plan, make_engine
from gradconflict.history import History
from gradconflict.report import ConflictReport, LayerReport

if TYPE_CHECKING:
    from gradconflict.diagnosis import Advice

__all__ = ["ConflictMonitor"]

OnNonFinite = Literal["raise", "skip", "propagate"]

#: Heads with fewer parameters than this are not tapped: materialising their T gradients in the batched backward
#: costs less than a tap's fixed overhead (a few small tensor operations).
MIN_TAPPED_HEAD_PARAMS = 1 << 16


class ConflictMonitor:
    """Measures the per-task gradients of a multi-task model on its shared parameters at each step.

    Args:
        model: the whole model (backbone and heads). Only hooks are registered on it; :meth:`close` (or leaving
            a ``with`` block) removes them.
        shared: the shared parameters: a module, an iterable of parameters, or ``None`` to discover them at
            the first step as the parameters that receive gradient from two or more tasks (with a single
            task, every parameter it reaches).
        engine: ``"auto"`` (one batched backward with per-layer rules, exact), ``"reference"`` (T separate
            backward passes, for checking) or ``"representation"`` (gradients at the output of ``shared``, which
            must then be a module: near free, approximate, and its reports say so).
        every: measure every ``every``-th :meth:`backward` call; the others are a plain weighted backward.
        threshold: cosine below which a task pair counts as conflicting (``S`` in the docs).
        on_nonfinite: ``"raise"`` (default) or ``"skip"`` when a loss is NaN or infinite; a skipped step
            leaves ``.grad`` untouched and is recorded in the history as skipped. Both read the losses on the
            host (one sync per measured step); ``"propagate"`` does not check, so NaNs flow into ``.grad`` and
            the report as with a plain backward, and ``backward()`` never waits for the device.
        ema_decay: decay of the history's moving averages.

    Attributes:
        history: a :class:`~gradconflict.History` of every measured (or skipped) step's report.
        step: the number of :meth:`backward` and :meth:`measure` calls so far.
    """

    def __init__(
        self,
        model: nn.Module,
        shared: nn.Module | Iterable[nn.Parameter] | None = None,
        *,
        engine: str = "auto",
        every: int = 1,
        threshold: float = 0.0,
        on_nonfinite: OnNonFinite = "raise",
        ema_decay: float = 0.9,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if on_nonfinite not in ("raise", "skip", "propagate"):
            raise ValueError(f"on_nonfinite must be 'raise', 'skip' or 'propagate', got {on_nonfinite!r}")
        self.model = model
        self.engine = make_engine(engine)
        self.every = every
        self.threshold = float(threshold)
        self.on_nonfinite = on_nonfinite
        self.history = History(ema_decay=ema_decay)
        self.step = 0
        self._backward_calls = 0
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._shared: list[nn.Parameter] | None = None if shared is None else self._resolve_shared(shared)
        self._capture: Capture | None = Capture(model) if self.engine.name == "auto" else None
        self._representation: OutputCapture | None = None
        if self.engine.name == "representation":
            if not isinstance(shared, nn.Module):
                raise ValueError(
                    "engine='representation' measures gradients at the shared module's output: pass shared=<the "
                    "backbone module> (a module whose forward output every head reads)"
                )
            name = next((n for n, m in model.named_modules() if m is shared), "shared")
            self._representation = OutputCapture(shared, name)
        self._plan: Plan | None = None

    # ----------------------------------------------------------------------------------------------- set-up
    def _resolve_shared(self, shared: nn.Module | Iterable[nn.Parameter]) -> list[nn.Parameter]:
        params = list(shared.parameters()) if isinstance(shared, nn.Module) else list(shared)
        for p in params:
            if not isinstance(p, torch.Tensor) or id(p) not in self._names:
                raise ValueError(
                    "shared= must be a submodule of the model or parameters of the model; got a "
                    f"{type(p).__name__} that is not among model.named_parameters()"
                )
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("shared= holds no parameter that requires grad: nothing to measure")
        return params

    def _make_plan(self, shared: list[nn.Parameter]) -> Plan:
        module_name = {m: n for n, m in self.model.named_modules()}
        layer_of: dict[int, str] = {}
        for mod_name, module in self.model.named_modules():
            for p_name, p in module.named_parameters(recurse=False):
                layer_of.setdefault(id(p), mod_name or p_name)
        float64 = any(p.dtype == torch.float64 for p in shared)
        return Plan(
            shared={id(p) for p in shared},
            layer_of=layer_of,
            module_name=module_name,
            gram_dtype=torch.float64 if float64 else torch.float32,
            capture=self._capture,
            representation=self._representation,
        )

    def _discover_shared(self, tasks: list[str], losses: list[Tensor]) -> list[nn.Parameter]:
        reached = [{id(t) for t in leaves_of(loss)} for loss in losses]
        params = [p for p in self.model.parameters() if p.requires_grad]
        need = 2 if len(losses) > 1 else 1
        shared = [p for p in params if sum(id(p) in r for r in reached) >= need]
        if not shared:
            raise ValueError(
                f"no parameter of the model receives gradient from two or more of the tasks {tasks}: there is no "
                "shared backbone to measure. Check that the losses come from this model, or pass shared=..."
            )
        return shared

    @property
    def shared_parameters(self) -> list[str]:
        """Names of the shared parameters (empty until discovered at the first step when ``shared=None``)."""
        return [self._names[id(p)] for p in self._shared or []]

    # ------------------------------------------------------------------------------------------ validation
    def _validate(
        self, losses: Mapping[str, Tensor], weights: Mapping[str, float] | None
    ) -> tuple[list[str], list[Tensor], Tensor]:
        if not isinstance(losses, Mapping) or not losses:
            raise ValueError("losses must be a non-empty dict {task name: scalar loss tensor}")
        tasks = [str(k) for k in losses]
        values = list(losses.values())
        for name, loss in zip(tasks, values):
            if not isinstance(loss, Tensor):
                raise TypeError(f"loss {name!r} is a {type(loss).__name__}, not a tensor")
            if loss.numel() != 1:
                raise ValueError(
                    f"loss {name!r} has shape {tuple(loss.shape)}; each loss must be a scalar (reduce it, "
                    "e.g. with .mean())"
                )
            if not loss.requires_grad:
                raise ValueError(f"loss {name!r} does not require grad: was it computed under torch.no_grad()?")
        devices = {str(loss.device) for loss in values}
        if len(devices) > 1:
            where = ", ".join(f"{n}: {loss.device}" for n, loss in zip(tasks, values))
            raise ValueError(f"the losses are on different devices ({where}); move them to one device")
        weights = dict(weights or {})
        unknown = sorted(set(map(str, weights)) - set(tasks))
        if unknown:
            raise ValueError(f"weights name unknown tasks {unknown}; the tasks are {tasks}")
        w = []
        for name in tasks:
            value = float(weights.get(name, 1.0))
            if not value >= 0 or value == float("inf"):
                raise ValueError(f"weight of task {name!r} is {value}; weights must be finite and >= 0")
            w.append(value)
        return tasks, values, torch.tensor(w, dtype=values[0].dtype, device=values[0].device)

    @staticmethod
    def _nonfinite(tasks: list[str], detached: Tensor) -> list[str]:
        return [t for t, ok in zip(tasks, torch.isfinite(detached).tolist()) if not ok]

    # ----------------------------------------------------------------------------------------------- steps
    def backward(
        self, losses: Mapping[str, Tensor], weights: Mapping[str, float] | None = None
    ) -> ConflictReport | None:
        """Replace ``(sum_i w_i L_i).backward()``: fill ``.grad`` exactly as it would and measure the step.

        Returns this step's :class:`~gradconflict.ConflictReport`, or ``None`` on a step that ``every`` skips
        (then this is a plain weighted backward).
        """
        tasks, values, w = self._validate(losses, weights)
        measured = self._backward_calls % self.every == 0
        self._backward_calls += 1
        if self._capture is not None:
            self._capture.enabled = self._backward_calls % self.every == 0  # for the next step's forward
        if not measured:
            self.step += 1
            total = sum(wi * loss.reshape(()) for wi, loss in zip(w.tolist(), values))
            total.backward()
            return None
        return self._measure(tasks, values, w, write_grads=True)

    def measure(self, losses: Mapping[str, Tensor], weights: Mapping[str, float] | None = None) -> ConflictReport:
        """The same report as :meth:`backward`, leaving ``.grad`` untouched and the graph alive for your own
        backward."""
        tasks, values, w = self._validate(losses, weights)
        return self._measure(tasks, values, w, write_grads=False)

    def _measure(self, tasks: list[str], losses: list[Tensor], w: Tensor, *, write_grads: bool) -> ConflictReport:
        step = self.step
        self.step += 1
        detached = torch.stack([x.detach().reshape(()) for x in losses])
        bad = [] if self.on_nonfinite == "propagate" else self._nonfinite(tasks, detached)
        if bad:
            if self.on_nonfinite == "raise":
                raise FloatingPointError(
                    f"non-finite loss for task(s) {bad} at step {step}; nothing was written to .grad. "
                    "Pass on_nonfinite='skip' to skip such steps"
                )
            report = ConflictReport.skipped_step(
                tasks,
                step,
                f"non-finite loss: {', '.join(bad)}",
                detached,
                engine=self.engine.name,
            )
            self.history.append(report)
            return report
        if self._shared is None:
            self._shared = self._discover_shared(tasks, losses)
        if self._plan is None:
            self._plan = self._make_plan(self._shared)
            if self._capture is not None:
                self._capture.restrict(self._plan.shared, MIN_TAPPED_HEAD_PARAMS)
        for name, loss in zip(tasks, losses):
            if not depends_on(loss, self._shared):
                raise ValueError(
                    f"loss {name!r} does not depend on any shared parameter; every task must use the shared "
                    f"backbone ({len(self._shared)} parameters, e.g. {self.shared_parameters[:3]})"
                )
        result = self.engine.run(losses, w, self._plan, keep_graph=not write_grads)
        if write_grads:
            for leaf, grad in result.grads.values():
                if leaf.grad is None:
                    leaf.grad = grad.detach()
                else:
                    leaf.grad += grad
        layers = {
            name: LayerReport(
                name,
                tasks,
                entry.gram,
                w,
                num_params=entry.num_params,
                route=entry.route,
                threshold=self.threshold,
            )
            for name, entry in result.layers.items()
        }
        report = ConflictReport(
            tasks,
            result.gram,
            w,
            losses=detached,
            layers=layers,
            step=step,
            engine=self.engine.name,
            approximate=self.engine.approximate,
            threshold=self.threshold,
        )
        self.history.append(report)
        return report

    def advise(self, **kwargs: Any) -> Advice:
        """Diagnose this run: :func:`gradconflict.advise` on :attr:`history`, with this model (see its
        keyword arguments: probe batch, evaluations, thresholds, ...)."""
        from gradconflict.diagnosis import advise

        kwargs.setdefault("model", self.model)
        return advise(self.history, **kwargs)

    # ----------------------------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Remove every hook from the model. The history stays readable."""
        if self._capture is not None:
            self._capture.close()
        if self._representation is not None:
            self._representation.close()

    def __enter__(self) -> ConflictMonitor:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
