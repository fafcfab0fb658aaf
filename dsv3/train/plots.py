"""PNG plots of a training run from its metric files, and the `dsv3 plot OUT` subcommand.

Reads what `metrics.MetricsLogger` writes and draws:
- `plots/loss.png`: train loss (raw, faint, and smoothed), validation loss points, MTP and balance
  losses on a second panel, learning rate on a small third panel;
- `plots/expert_load.png`: each layer's share of routed tokens per expert at the last logged step,
  and MaxVio per layer over steps.
A panel whose columns were never logged is left out. Figures are built on `matplotlib.figure.Figure`
and rendered with Agg, without pyplot: no display, and no process-wide backend switch.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from dsv3.train.metrics import max_violation_per_layer, read_jsonl


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    # (steps, values) of the rows where `key` was logged as a finite number (null marks NaN/inf).
    pairs = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
    steps, values = zip(*pairs) if pairs else ((), ())
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def _smooth(y: np.ndarray) -> np.ndarray:
    # Debiased EMA over ~2% of the points, as TensorBoard does, so the start is not pulled to 0.
    beta = 1.0 - 1.0 / max(1.0, len(y) / 50)
    out, avg = np.empty_like(y), 0.0
    for i, v in enumerate(y):
        avg = beta * avg + (1 - beta) * v
        out[i] = avg / (1 - beta ** (i + 1))
    return out


def _save(fig: Figure, path: Path) -> Path:
    # Through a temporary file, so that a failure never leaves a half-written PNG behind.
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    return path


def _plot_loss(rows: list[dict], path: Path) -> Path | None:
    loss, val = _series(rows, "loss"), _series(rows, "val_loss")
    mtp, bal = _series(rows, "mtp_loss"), _series(rows, "balance_loss")
    lr = _series(rows, "lr")
    panels = [name for name, has in (("loss", len(loss[0]) or len(val[0])),
                                     ("aux", len(mtp[0]) or len(bal[0])),
                                     ("lr", len(lr[0]))) if has]
    if not panels:
        return None
    heights = {"loss": 3, "aux": 2, "lr": 1}
    fig = Figure(figsize=(9, 1.6 * sum(heights[p] for p in panels) + 0.5), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": [heights[p] for p in panels]})[:, 0]
    for ax, panel in zip(axes, panels):
        if panel == "loss":
            if len(loss[0]):
                ax.plot(*loss, color="C0", alpha=0.25, linewidth=0.8, label="train (raw)")
                ax.plot(loss[0], _smooth(loss[1]), color="C0", label="train (smoothed)")
            if len(val[0]):
                ax.plot(*val, "o", color="C3", markersize=4, label="validation")
            ax.set_ylabel("loss")
            ax.legend(loc="upper right")
        elif panel == "aux":
            if len(mtp[0]):
                ax.plot(mtp[0], _smooth(mtp[1]), color="C1")
                ax.set_ylabel("MTP loss", color="C1")
            if len(bal[0]):
                twin = ax.twinx() if len(mtp[0]) else ax  # balance loss is orders of magnitude smaller
                twin.plot(bal[0], _smooth(bal[1]), color="C2")
                twin.set_ylabel("balance loss", color="C2")
        else:
            ax.plot(*lr, color="C4")
            ax.set_ylabel("lr")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    return _save(fig, path)


def _plot_expert_load(rows: list[dict], path: Path) -> Path:
    last = np.asarray(rows[-1]["loads"], dtype=float)  # [layers, experts]
    totals = last.sum(axis=1, keepdims=True)
    share = np.divide(last, totals, out=np.zeros_like(last), where=totals > 0)
    steps = [r["step"] for r in rows]
    vio = np.asarray([max_violation_per_layer(r["loads"]) for r in rows])  # [logged steps, layers]
    n_layers, n_experts = last.shape

    fig = Figure(figsize=(10, min(4 + 0.15 * n_layers, 10)), layout="constrained")
    heat, lines = fig.subplots(1, 2, width_ratios=[3, 2])
    image = heat.imshow(share, aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(image, ax=heat, label=f"share of the layer's routed tokens (balanced = 1/{n_experts})")
    heat.set(title=f"expert load at step {steps[-1]}", xlabel="expert", ylabel="MoE layer (main, then MTP)")
    heat.yaxis.get_major_locator().set_params(integer=True)  # layer indices, not fractions
    few = n_layers <= 12  # beyond that, per-layer lines are faint and unlabelled; the mean carries it
    for layer in range(n_layers):
        lines.plot(steps, vio[:, layer], linewidth=1 if few else 0.5, alpha=1 if few else 0.3,
                   label=f"layer {layer}" if few else None)
    if n_layers > 1:
        lines.plot(steps, vio.mean(axis=1), color="black", linewidth=2, label="mean over layers")
    lines.legend(fontsize="small", ncol=2 if n_layers > 6 else 1)
    lines.set(title="MaxVio = max load / mean load - 1", xlabel="step", ylabel="MaxVio")
    lines.grid(alpha=0.3)
    return _save(fig, path)


def plot_run(out_dir: str | os.PathLike) -> list[Path]:
    """Write the run's plots into `out_dir/plots/` and return their paths."""
    out_dir = Path(out_dir)
    metrics_path = out_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {out_dir}: nothing to plot")
    plots_dir = out_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    written = [_plot_loss(read_jsonl(metrics_path), plots_dir / "loss.png")]
    loads_path = out_dir / "expert_loads.jsonl"
    loads = read_jsonl(loads_path) if loads_path.is_file() else []
    if loads:
        written.append(_plot_expert_load(loads, plots_dir / "expert_load.png"))
    return [p for p in written if p is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dsv3 plot",
        description="Draw a training run's loss, learning-rate and expert-load curves as PNGs "
                    "in OUT/plots/, from the metrics.jsonl and expert_loads.jsonl that training wrote.",
        epilog="example:\n  dsv3 plot runs/tiny    # writes runs/tiny/plots/loss.png and expert_load.png",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", metavar="OUT", type=Path, help="the run's output folder")
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        print(f"dsv3 plot: no such folder: {args.out}", file=sys.stderr)
        return 2
    try:
        paths = plot_run(args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"dsv3 plot: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
