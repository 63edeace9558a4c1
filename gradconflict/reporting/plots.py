# One file of ~470 lines on purpose: every figure of the report shares its style (WIDTH, the colours, the layer
# labels, figure_to_png), which a split would have to expose.
"""Figures of a run, drawn with matplotlib: what the HTML report shows and what the dashboard sinks send as images.

Each function takes the run's measured steps aligned by task name
(:func:`gradconflict.diagnosis.align`, tasks in sorted order) or the diagnosis' results, and returns a
``matplotlib.figure.Figure`` built without ``pyplot``: no global state is touched, nothing opens a window, and
any backend works. :func:`run_figures` draws every figure of the report, in its order; :func:`figure_to_png`
and :func:`figure_to_rgb` turn one into PNG bytes or an RGB array.

Steps that lack a task (partial labels, round-robin training) leave gaps: a pair's cosine is drawn on the steps
that carried both tasks, and a figure whose quantity was never measured says so instead of drawing nothing.

Needs matplotlib (``pip install "gradconflict[plots]"``); ``import gradconflict`` does not import this module.

>>> import torch
>>> from gradconflict import ConflictReport
>>> from gradconflict.diagnosis import align
>>> run = align([ConflictReport("ab", torch.tensor([[1.0, c], [c, 1.0]]), step=s) for s, c in enumerate([.5, -.5])])
>>> fig = pair_cosines(run)
>>> fig.axes[0].lines[0].get_ydata().tolist()
[0.5, -0.5]
>>> figure_to_png(fig)[:4]
b'\\x89PNG'
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle

from gradconflict.diagnosis.advice import Advice
from gradconflict.diagnosis.aligned import Aligned
from gradconflict.diagnosis.examples import ConflictingExamples
from gradconflict.diagnosis.profile import Profile, worst_pair
from gradconflict.diagnosis.trends import window_means
from gradconflict.records.pairs import pair_key

__all__ = [
    "affinity_matrix",
    "cancellation_and_update",
    "conflicting_examples_figure",
    "cosine_heatmap",
    "figure_to_png",
    "figure_to_rgb",
    "layer_heatmap",
    "layer_profile_figure",
    "norms_and_alignment",
    "pair_cosines",
    "run_figures",
]

#: Width of every time-series figure, in inches (at 100 dpi: the width of the HTML report's column).
WIDTH = 11.0
#: Most columns of the layer heat-map: longer runs are binned by training step.
MAX_COLUMNS = 200
#: Most layers labelled on the layer figures (above that, every k-th).
MAX_LABELS = 40
#: Most ids drawn as bars per pair on the examples figure (the first of the ranking).
MAX_BARS = 30
#: Most points of a concentration curve drawn (longer ones are sampled evenly, both ends kept).
MAX_POINTS = 2000
#: Most steps of a time series drawn one by one: a longer series (more steps than the figure has pixels) is drawn
#: as the range of its values over :data:`MAX_POINTS` bins of steps, with its moving mean sampled at each bin.
MAX_STEPS = 4 * MAX_POINTS
NO_PAIR = "no measured step carried two tasks together: no pair to compare"


def _figure(height: float, rows: int = 1, width: float = WIDTH) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, list(axes)


def _say(ax: Axes, text: str) -> None:
    """A figure of one empty panel, made short, that says why it is empty."""
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="0.35", wrap=True)
    figure = ax.figure if isinstance(ax.figure, Figure) else ax.figure.figure  # the page, not a sub-figure
    figure.set_size_inches(figure.get_figwidth(), 0.8)


def _smooth(steps: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A moving mean over about 1/30 of the steps spanned (at least one step)."""
    width = max(1, int(steps[-1] - steps[0] + 1) // 30)
    return window_means(steps, values, width)


def _log_if_wide(ax: Axes, values: np.ndarray) -> None:
    """A log scale when the positive values span more than a factor of 30, so that small tasks stay visible."""
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size and positive.max() > 30 * positive.min():
        ax.set_yscale("log")


def _series(ax: Axes, steps: np.ndarray, values: np.ndarray, label: str, color: object) -> None:
    """Raw values as a thin line, and their moving mean on top when the run is long enough to need it. Beyond
    :data:`MAX_STEPS` steps the raw values are drawn as their range (lowest to highest) in each of
    :data:`MAX_POINTS` bins of steps: a line through a million points is that band anyway, and drawing it would
    hold every point in the figure."""
    long = len(values) > 60
    sparse = len(values) < 60 and len(values) < int(steps[-1] - steps[0] + 1) // 2  # gaps: show the points
    if len(values) > MAX_STEPS:
        starts = np.linspace(0, len(values), MAX_POINTS + 1).astype(np.int64)[:-1]  # each bin's first step
        low, high = np.fmin.reduceat(values, starts), np.fmax.reduceat(values, starts)
        ax.fill_between(steps[starts], low, high, color=color, alpha=0.25, lw=0, step="post")
        ax.plot(steps[starts], _smooth(steps, values)[starts], color=color, lw=1.8, label=f"{label} (moving mean)")
        return
    ax.plot(
        steps, values, color=color, lw=0.8, alpha=0.35 if long else 1.0, label=None if long else label,
        marker="o" if sparse else None, ms=2.5,
    )
    if long:
        ax.plot(steps, _smooth(steps, values), color=color, lw=1.8, label=f"{label} (moving mean)")


def _color(k: int) -> object:
    return colormaps["tab10"](k % 10)


def _legend(ax: Axes) -> None:
    """The legend outside the panel, on its right."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9, frameon=False)


def _cosine_scale(ax: Axes, line_at: float) -> None:
    """A cosine's [-1, 1] axis with a dashed line where conflict starts."""
    ax.axhline(line_at, color="0.3", lw=1, ls="--")
    ax.set_ylim(-1.05, 1.05)


def _note(ax: Axes, text: str) -> None:
    """Text in the middle of a panel (of a figure with other panels) that has nothing to draw."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.35")


def _labels(ax: Axes, ylabel: str, title: str, xlabel: str = "") -> None:
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if xlabel:
        ax.set_xlabel(xlabel)


def pair_cosines(run: Aligned) -> Figure:
    """The cosine of each pair of tasks over training, on the steps that carried both (conflict below the dashed
    line at the run's threshold ``S``). The first line of each pair holds the raw values."""
    fig, (ax,) = _figure(3.6)
    T = len(run.tasks)
    pairs = [(i, j) for i in range(T) for j in range(i + 1, T) if run.together[:, i, j].any()]
    if not pairs:
        _say(ax, NO_PAIR)
        return fig
    for k, ((i, j), cosine) in enumerate(zip(pairs, run.cosine_pairs(pairs).T)):
        both = run.together[:, i, j]
        _series(ax, run.steps[both], cosine[both], pair_key(run.tasks[i], run.tasks[j]), _color(k))
    _cosine_scale(ax, run.threshold)
    _labels(ax, "cosine", "Pairwise cosine of the task gradients (below the dashed line: conflict)", "training step")
    _legend(ax)
    return fig


def cancellation_and_update(run: Aligned) -> Figure:
    """Magnitude cancellation (on the steps that carried two tasks or more) and the norm of the update, over
    training."""
    fig, (top, bottom) = _figure(4.6, rows=2)
    if run.multi.any():
        _series(top, run.steps[run.multi], run.cancellation[run.multi], "cancellation", _color(3))
        top.set_ylim(-0.02, 1.02)
        _legend(top)
    else:
        _note(top, NO_PAIR)
    _labels(
        top, "cancellation", "Magnitude cancellation 1 - |sum w_i g_i| / sum w_i |g_i| (share of the gradient lost)"
    )
    _series(bottom, run.steps, run.update_norm, "update norm", _color(0))
    _log_if_wide(bottom, run.update_norm)
    _labels(bottom, "|update|", "Norm of the update sqrt(w^T G w) on the shared parameters", "training step")
    _legend(bottom)
    return fig


def norms_and_alignment(run: Aligned) -> Figure:
    """Each task's gradient norm, and its alignment with the update (cosine of ``g_i`` with ``sum_j w_j g_j``;
    below 0 the step raises that task's loss, to first order), over training."""
    fig, (top, bottom) = _figure(5.0, rows=2)
    for k, task in enumerate(run.tasks):
        here = run.present[:, k]
        _series(top, run.steps[here], run.task_norms[here, k], task, _color(k))
        aligned = here & run.multi
        if aligned.any():
            _series(bottom, run.steps[aligned], run.alignment[aligned, k], task, _color(k))
    _log_if_wide(top, run.task_norms)
    _labels(top, "|g_i|", "Gradient norm of each task on the shared parameters")
    _legend(top)
    if run.multi.any():
        _cosine_scale(bottom, 0.0)
        _legend(bottom)
    else:
        _note(bottom, NO_PAIR)
    _labels(
        bottom, "alignment", "Alignment of each task with the update (below 0: the step raises that task's loss)",
        "training step",
    )
    return fig


def layer_worst_cosine(run: Aligned, order: Sequence[str]) -> np.ndarray:
    """``[L, S]``: on each layer of ``order`` and measured step, the lowest cosine over the pairs of tasks the
    step carried on that layer (:meth:`~gradconflict.diagnosis.aligned.Aligned.layer_worst_cosine`; NaN where it
    carried none)."""
    index = {name: k for k, name in enumerate(run.layers)}
    return run.layer_worst_cosine().T[[index[name] for name in order]]


def _bin_steps(steps: np.ndarray, values: np.ndarray, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """``values [L, S]`` averaged into at most ``columns`` bins of training steps (NaN-aware); returns the bin
    edges and the ``[L, bins]`` means."""
    if len(steps) <= columns:
        edges = np.concatenate([steps - 0.5, [steps[-1] + 0.5]]).astype(np.float64)
        return edges, values
    edges = np.linspace(steps[0], steps[-1] + 1, columns + 1)
    which = np.clip(np.searchsorted(edges, steps, side="right") - 1, 0, columns - 1)
    finite = ~np.isnan(values)
    total = np.zeros((values.shape[0], columns))
    count = np.zeros((values.shape[0], columns))
    np.add.at(total.T, which, np.where(finite, values, 0.0).T)
    np.add.at(count.T, which, finite.T)
    with np.errstate(invalid="ignore"):
        return edges, np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _layer_ticks(ax: Axes, names: Sequence[str]) -> None:
    every = max(1, -(-len(names) // MAX_LABELS))
    ticks = list(range(0, len(names), every))
    ax.set_yticks(ticks, [names[k] for k in ticks], fontsize=8)


def layer_heatmap(run: Aligned, profile: Profile | None) -> Figure:
    """Layers (bottom of the network at the bottom) by training steps: the lowest pair cosine of each layer at
    each step (red: the layer's task gradients conflict; blue: they agree; grey: not measured). Long runs are
    averaged into at most :data:`MAX_COLUMNS` bins of steps."""
    order = [layer.name for layer in profile.layers] if profile is not None else list(run.layers)
    fig, (ax,) = _figure(min(12.0, max(2.6, 0.22 * len(order) + 1.4)))
    if not order:
        _say(ax, "the reports carry no layers: nothing to draw per layer")
        return fig
    values = layer_worst_cosine(run, order)
    if np.isnan(values).all():
        _say(ax, NO_PAIR)
        return fig
    edges, binned = _bin_steps(run.steps, values, MAX_COLUMNS)
    cmap = colormaps["RdBu"].with_extremes(bad="0.85")
    mesh = ax.pcolormesh(edges, np.arange(len(order) + 1) - 0.5, binned, cmap=cmap, vmin=-1, vmax=1)
    _layer_ticks(ax, order)
    if profile is not None and profile.branch_point is not None:
        k = order.index(profile.branch_point)
        ax.axhline(k - 0.5, color="k", lw=1.5, ls="--")
        ax.text(
            edges[0], k - 0.5, f" branch point: {profile.branch_point} ", va="bottom", fontsize=9,
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1.5},
        )
    ax.set_xlabel("training step")
    ax.set_title("Lowest pair cosine per layer and step (red: conflict, blue: agreement, grey: not measured)")
    fig.colorbar(mesh, ax=ax, label="cosine", fraction=0.03, pad=0.01)
    return fig


def layer_profile_figure(profile: Profile | None) -> Figure:
    """The layer conflict profile: per layer (bottom to top), the persistence of its worst pair (the share of
    steps on which that pair conflicts), the threshold from which a layer counts as conflicting, and the advised
    branch point (the layers from there up are drawn darker)."""
    layers = [] if profile is None else profile.layers
    fig, (ax,) = _figure(min(12.0, max(2.6, 0.24 * len(layers) + 1.4)))
    if profile is None or not layers:
        _say(ax, "the reports carry no layers: no layer profile")
        return fig
    names = [layer.name for layer in layers]
    worst = np.array([layer.worst_persistence for layer in layers])
    above = names.index(profile.branch_point) if profile.branch_point is not None else len(names)
    colors = [_color(3) if k >= above else (0.55, 0.62, 0.75) for k in range(len(names))]
    ax.barh(np.arange(len(names)), np.nan_to_num(worst), color=colors)
    for k, layer in enumerate(layers):
        i, j = worst_pair(layer.persistence, layer.mean_cosine)
        label = (
            "no pair measured"
            if np.isnan(worst[k])
            else f"{pair_key(profile.tasks[i], profile.tasks[j])}  mean cos {layer.mean_cosine[i, j]:+.2f}"
        )
        if len(names) <= MAX_LABELS:
            ax.text(min(np.nan_to_num(worst[k]), 1.0) + 0.01, k, label, va="center", fontsize=8)
    ax.axvline(profile.threshold, color="0.3", lw=1, ls="--")
    _layer_ticks(ax, names)
    ax.set_xlim(0, 1.45)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel("persistence of the worst pair (share of steps it conflicts on)")
    where = f"branch point: {profile.branch_point}" if profile.branch_point is not None else "no branch point"
    ax.set_title(f"Layer conflict profile, bottom to top ({where}; dashed: conflict threshold {profile.threshold:g})")
    return fig


def _matrix(ax: Axes, values: np.ndarray, tasks: Sequence[str], norm: TwoSlopeNorm, fmt: str) -> AxesImage:
    cmap = colormaps["RdBu"].with_extremes(bad="0.85")
    image = ax.imshow(values, cmap=cmap, norm=norm)
    T = len(tasks)
    ax.set_xticks(range(T), tasks, rotation=45 if T > 4 else 0, ha="right" if T > 4 else "center")
    ax.set_yticks(range(T), tasks)
    if T <= 12:
        for i in range(T):
            for j in range(T):
                value = values[i, j]
                text = "n/a" if np.isnan(value) else format(value, fmt)
                dark = not np.isnan(value) and abs(value) >= 0.6  # a saturated cell: white text stays readable
                ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if dark else "black")
    return image


def cosine_heatmap(cosine: np.ndarray, tasks: Sequence[str], title: str = "Cosine of the task gradients") -> Figure:
    """A T x T cosine matrix as a heat-map with the values written in (NaN, a pair never measured together, in
    grey): the image the TensorBoard and W&B sinks log, and the report's mean cosine matrix.

    >>> cosine_heatmap(np.array([[1.0, -0.5], [-0.5, 1.0]]), ["a", "b"]).axes[0].get_title()
    'Cosine of the task gradients'
    """
    size = 1.6 + 0.5 * len(tasks)
    fig = Figure(figsize=(size + 1.2, size), dpi=100, layout="constrained")
    ax = fig.subplots()
    image = _matrix(ax, np.asarray(cosine, dtype=np.float64), tasks, TwoSlopeNorm(0.0, -1.0, 1.0), "+.2f")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.05)
    return fig


def mean_cosine(run: Aligned) -> np.ndarray:
    """``[T, T]`` each pair's mean cosine over the steps that carried both tasks (NaN: never together), 1 on the
    diagonal."""
    C = run.mean_cosine()
    np.fill_diagonal(C, 1.0)
    return C


def affinity_matrix(affinity: np.ndarray, tasks: Sequence[str], groups: Sequence[Sequence[str]]) -> Figure:
    """The normalised inter-task affinity ``N_ij`` (row ``i`` onto column ``j``: how much a step on ``i`` lowers
    ``L_j`` compared with a step on ``j`` itself), tasks ordered by group, with the groups outlined."""
    order = [t for g in groups for t in g] + [t for t in tasks if not any(t in g for g in groups)]
    index = [list(tasks).index(t) for t in order]
    values = np.asarray(affinity, dtype=np.float64)[np.ix_(index, index)]
    finite = values[np.isfinite(values)]
    low, high = (min(-1.0, float(finite.min())), max(1.0, float(finite.max()))) if finite.size else (-1.0, 1.0)
    size = 1.8 + 0.55 * len(order)
    fig = Figure(figsize=(size + 1.4, size), dpi=100, layout="constrained")
    ax = fig.subplots()
    image = _matrix(ax, values, order, TwoSlopeNorm(0.0, low, high), "+.2f")
    start = 0
    for group in groups:
        ax.add_patch(Rectangle((start - 0.5, start - 0.5), len(group), len(group), fill=False, ec="k", lw=2.5))
        start += len(group)
    ax.set_xlabel("task j (affected)")
    ax.set_ylabel("task i (stepped on)")
    ax.set_title("Affinity N_ij and task groups (outlined)")
    fig.colorbar(image, ax=ax, fraction=0.05)
    return fig


def conflicting_examples_figure(
    found: Sequence[ConflictingExamples], curves: Mapping[tuple[str, str], np.ndarray]
) -> Figure:
    """The examples that carry each pair's conflict, one row per pair: on the left the concentration curve (ids
    ranked by within-example agreement, lowest first, against the share of the pair's negative push they carry;
    dashed, the diagonal of a conflict spread evenly; dotted, the named set), on the right each named id's share
    (the first :data:`MAX_BARS`). ``found`` are :func:`~gradconflict.diagnosis.examples.conflicting_examples`' results,
    ``curves`` each pair's :func:`~gradconflict.diagnosis.examples.carried_curve`.

    >>> import torch
    >>> from gradconflict.records.samples import SampleTally
    >>> from gradconflict.diagnosis.examples import carried_curve, conflicting_examples
    >>> tally = SampleTally()
    >>> tally.add_pair(("a", "b"), list(range(20)), torch.tensor([-4.0] + [0.1] * 19), torch.linspace(-1, 1, 20))
    >>> found, curve = conflicting_examples(tally, "a", "b"), carried_curve(tally, "a", "b")
    >>> fig = conflicting_examples_figure([found], {("a", "b"): curve})
    >>> [float(p.get_height()) for p in fig.axes[1].patches]     # id 0 carries all of the negative push
    [1.0]
    """
    fig = Figure(figsize=(WIDTH, 0.4 + 2.8 * max(len(found), 1)), dpi=100, layout="constrained")
    axes = fig.subplots(max(len(found), 1), 2, squeeze=False, width_ratios=[1, 1.6])
    if not found:
        axes[0, 1].set_axis_off()
        _say(axes[0, 0], "no attributed pair: measure steps with sample_ids= to name the examples")
        return fig
    for (curve_ax, bars_ax), f in zip(axes, found):
        name = pair_key(*f.pair)
        curve = np.asarray(curves[f.pair], dtype=np.float64)
        n = len(curve)
        keep = np.unique(np.linspace(0, n - 1, min(n, MAX_POINTS)).round().astype(int))
        curve_ax.plot(np.concatenate([[0.0], (keep + 1) / n]), np.concatenate([[0.0], curve[keep]]), color=_color(3))
        curve_ax.plot([0, 1], [0, 1], color="0.5", lw=1, ls="--")
        if f.examples:
            curve_ax.axvline(f.id_share, color="0.3", lw=1, ls=":")
        curve_ax.set_xlim(0, 1)
        curve_ax.set_ylim(0, 1.02)
        _labels(curve_ax, "share of the negative push", f"{name}: ids ranked by {f.ranked_by}, lowest first",
                "share of the ids")
        shown = f.examples[:MAX_BARS]
        if not shown:
            _note(bars_ax, "no small set of ids carries the conflict" if f.push_share is not None
                  else "no id pushes the pair apart")
            bars_ax.set_axis_off()
            continue
        bars_ax.bar(range(len(shown)), [e.share for e in shown], color=_color(3))
        bars_ax.set_xticks(range(len(shown)), [str(e.id) for e in shown], rotation=90, fontsize=8)
        _labels(bars_ax, "share", f"{name}: {len(f.examples)} ids ({f.id_share:.1%}) carry "
                f"{f.push_share or 0.0:.0%} of the negative push", "id")
    return fig


def run_figures(run: Aligned, advice: Advice, affinity: np.ndarray) -> dict[str, Figure]:
    """Every figure of the HTML report, by name, in the report's order: ``cosines``, ``cancellation``,
    ``norms``, ``layers``, ``profile``, ``mean_cosine``, ``affinity``."""
    return {
        "cosines": pair_cosines(run),
        "cancellation": cancellation_and_update(run),
        "norms": norms_and_alignment(run),
        "layers": layer_heatmap(run, advice.profile),
        "profile": layer_profile_figure(advice.profile),
        "mean_cosine": cosine_heatmap(mean_cosine(run), run.tasks, "Mean cosine over the run"),
        "affinity": affinity_matrix(affinity, run.tasks, advice.groups),
    }


def figure_to_png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """The figure as an ``[H, W, 3]`` uint8 RGB array (what ``SummaryWriter.add_image(..., dataformats="HWC")``
    and ``wandb.Image`` take).

    >>> figure_to_rgb(Figure(figsize=(2, 1), dpi=50)).shape
    (50, 100, 3)
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def __getattr__(name: str) -> object:
    # The figure was called layer_profile, the name of the diagnosis' gradconflict.diagnosis.layer_profile (the
    # profile itself): kept for old code, with a warning.
    if name == "layer_profile":
        import warnings

        warnings.warn(
            "gradconflict.reporting.plots.layer_profile is now layer_profile_figure (gradconflict.diagnosis."
            "layer_profile computes the profile it draws); the old name goes in a later release",
            DeprecationWarning,
            stacklevel=2,
        )
        return layer_profile_figure
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
