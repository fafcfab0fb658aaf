"""Compare training runs' loss curves: repeats of one precision against another, same seed and batches.

Takes arms out of `fp8_validation.py` JSONs (one device call per arm or two, at the bench batch) and
reports, for every pair, the report's metric (relative error of 20-step means, maximum over the last
80 % of steps) with the mean absolute and the signed mean gap, and the same against the mean of the
reference runs.  Repeats of the same arm give its run-to-run scatter: on the GPU neither precision is
deterministic by default (cuDNN attention's backward, atomics), so the scatter of BF16 against BF16 is the
floor that FP8 is held to; under `fp8_validation --deterministic` BF16 repeats bit for bit (run 26).  Writes <name>.json and <name>.png (each curve's gap to the references' mean) to --out.

    python bench/loss_curves.py bf16_a=runA.json:bf16 fp8_a=runA.json:fp8 bf16_b=runB.json:bf16 \\
        fp8_b=runC.json:fp8 --ref bf16_a,bf16_b --name fp8_repeats
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from fp8_validation import loss_error, smoothed  # noqa: E402

KEYS = ("commit", "device", "date", "preset", "batch", "seq", "steps", "lr", "warmup", "data_source", "data", "fp8_scales",
        "fp8_keep", "moments")


def load_curve(spec: str) -> tuple[str, dict]:
    """'label=file.json:arm[:seed]' -> (label, {"loss": [...], "source": {...}})."""
    label, _, where = spec.partition("=")
    file, arm, *seed = where.split(":")
    if not (label and file and arm):
        raise SystemExit(f"{spec!r}: expected label=file.json:arm[:seed]")
    res = json.loads(Path(file).read_text())
    runs = res.get("runs_by_seed") or {}
    seed = seed[0] if seed else min(runs, key=int, default=None)
    if seed not in runs or arm not in runs[seed]:
        have = {s: sorted(r) for s, r in runs.items()}
        raise SystemExit(f"{spec!r}: {file} has no arm {arm!r} for seed {seed}; it has {have}")
    source = {k: res.get(k) for k in KEYS} | {"file": Path(file).name, "arm": arm, "seed": int(seed)}
    return label, {"loss": runs[seed][arm]["loss"], "source": source}


def gap(ref: list[float], other: list[float], tail: float) -> dict:
    e = loss_error(ref, other, tail=tail)
    return {k: round(100 * e[k], 3) for k in ("max_rel_loss_err", "mean_rel_loss_err", "signed_mean_rel_loss_err")}


def compare(curves: dict[str, dict], refs: list[str], tail: float = 0.8) -> dict:
    """Pairwise errors in percent (the second label against the first), and each curve against the
    references' mean curve."""
    names = list(curves)
    shapes = {k: (c["source"]["preset"], c["source"]["batch"], c["source"]["seq"], c["source"]["data_source"], len(c["loss"]))
              for k, c in curves.items()}
    if len(set(shapes.values())) > 1:
        raise SystemExit(f"runs of different configs do not compare: {shapes}")
    pairs = {f"{b} vs {a}": gap(curves[a]["loss"], curves[b]["loss"], tail) for i, a in enumerate(names) for b in names[i + 1:]}
    ref_mean = [statistics.fmean(v) for v in zip(*(curves[r]["loss"] for r in refs))]
    vs_ref = {k: gap(ref_mean, c["loss"], tail) for k, c in curves.items()}
    final = {k: round(smoothed(c["loss"], 20)[-1], 4) for k, c in curves.items()}
    return {"refs": refs, "tail": tail, "pairs_pct": pairs, "vs_ref_mean_pct": vs_ref, "final_smoothed": final,
            "sources": {k: c["source"] for k, c in curves.items()}}


def plot(path: Path, curves: dict[str, dict], refs: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = smoothed([statistics.fmean(v) for v in zip(*(curves[r]["loss"] for r in refs))], 20)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [2, 2]})
    steps = range(1, len(ref) + 1)
    for k, c in curves.items():
        s = smoothed(c["loss"], 20)
        style = "-" if k in refs else "--"
        ax.plot(steps, s, ls=style, lw=0.9, label=k)
        ax2.plot(steps, [100 * (x - r) / r for r, x in zip(ref, s)], ls=style, lw=0.9, label=k)
    ax.set_ylabel("training loss, 20-step mean")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    for y in (0.25, -0.25):
        ax2.axhline(y, color="tab:gray", ls=":")
    ax2.axvline(int(0.2 * len(ref)) + 1, color="tab:gray", ls="--", lw=0.6)
    ax2.set_ylabel(f"gap to the mean of {', '.join(refs)} (%)")
    ax2.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("curves", nargs="+", metavar="LABEL=FILE:ARM[:SEED]")
    p.add_argument("--ref", required=True, help="comma-separated labels whose mean curve is the reference")
    p.add_argument("--tail", type=float, default=0.8, help="fraction of steps at the end that the metric covers")
    p.add_argument("--name", default="loss_curves")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    curves = dict(load_curve(s) for s in args.curves)
    refs = [r for r in args.ref.split(",") if r]
    if missing := [r for r in refs if r not in curves]:
        raise SystemExit(f"--ref {missing}: not among the labels {list(curves)}")
    res = compare(curves, refs, args.tail)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    first = next(iter(curves.values()))
    src = first["source"]
    plot(out / f"{args.name}.png", curves, refs,
         f"{src['preset']} config, B{src['batch']} x T{src['seq']}, {len(first['loss'])} steps, "
         f"{src['device']}, {src['date']}: every run's gap to the mean of {', '.join(refs)}")
    print(f"{'pair':28s} {'max %':>7s} {'mean %':>7s} {'signed %':>9s}")
    for k, v in list(res["pairs_pct"].items()) + [(f"{k} vs ref mean", v) for k, v in res["vs_ref_mean_pct"].items()]:
        print(f"{k:28s} {v['max_rel_loss_err']:7.2f} {v['mean_rel_loss_err']:7.2f} {v['signed_mean_rel_loss_err']:+9.2f}")
    print(json.dumps({"vs_ref_mean_pct": res["vs_ref_mean_pct"], "final_smoothed": res["final_smoothed"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
