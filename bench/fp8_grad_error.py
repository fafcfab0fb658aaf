"""How far FP8 and BF16 gradients are from fp32 ones at the same weights and batch, parameter by parameter.

A loss curve mixes every error of a precision into one chaotic trajectory; this measures the gradient itself.
It trains --preset in BF16 for --warm steps (the trainer's AdamW, clipping at 1.0, the built-in corpus), then,
for each of --probes later batches, computes the gradient of the same loss at the same weights in fp32 (no
autocast: the reference), BF16 (autocast) and FP8 (`precision.prepare_model(.., "fp8")` under the same
autocast; the reference backend on a CPU), and FP8 with each --keep variant (module-name prefixes left BF16).

Per precision and probe: the whole gradient's relative error |g - g32| / |g32| and cosine, and the parameters
that hold most of the error (their share of |g - g32|^2 and their own relative error).  Also, per layer, the
ratio of the largest to the median singular value of the query down-projection wq_a: a near-rank-1 wq_a
makes the q-norm's backward ill-conditioned (run 23: layer 0's, after 100 steps of the small preset).

    python bench/fp8_grad_error.py --preset small --warm 100 --probes 2 --keep layers.0.attn.wq_a --sensitivity
    python bench/fp8_grad_error.py --device cuda --preset bench --warm 300

Writes fp8_grad_error_<date>.json to --out and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import git_commit  # noqa: E402
from bench.fp8_validation import batches_for  # noqa: E402
from dsv3 import ModelConfig, Transformer  # noqa: E402
from dsv3 import precision as prec  # noqa: E402
from dsv3.train.config import TrainConfig  # noqa: E402
from dsv3.train.losses import training_loss  # noqa: E402
from dsv3.train.optim import build_optimizer  # noqa: E402
from dsv3.train.schedules import LRSchedule  # noqa: E402

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def gradient(model, tokens, autocast: torch.dtype | None) -> tuple[dict[str, torch.Tensor], float]:
    """Parameter name -> fp64 copy of its gradient for one batch [B, T+1], and the loss."""
    model.zero_grad(set_to_none=True)
    dev = tokens.device.type
    with torch.autocast(dev, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = model(tokens[:, :-1], return_aux=True)
        loss, parts = training_loss(out, tokens[:, 1:], 0.0)
    loss.backward()
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, float(parts["loss"])


def compare(g: dict, g32: dict, top: int = 6) -> dict:
    sq = {n: float((g[n] - g32[n]).pow(2).sum()) for n in g32}
    ref = {n: float(g32[n].pow(2).sum()) for n in g32}
    err, norm = math.sqrt(sum(sq.values())), math.sqrt(sum(ref.values()))
    dot = sum(float((g[n] * g32[n]).sum()) for n in g32)
    gnorm = math.sqrt(sum(float(g[n].pow(2).sum()) for n in g32))
    worst = sorted(sq, key=sq.get, reverse=True)[:top]
    return {"rel_err": err / norm, "cos": dot / (gnorm * norm), "norm_ratio": gnorm / norm,
            "top": [{"param": n, "error_share": sq[n] / max(err ** 2, 1e-300),
                     "rel_err": math.sqrt(sq[n] / max(ref[n], 1e-300))} for n in worst]}


def wq_a_conditioning(model) -> list[float]:
    """Per layer with q-LoRA: largest / median singular value of wq_a."""
    out = []
    for layer in model.layers:
        w = getattr(layer.attn, "wq_a", None)
        if w is not None:
            s = torch.linalg.svdvals(w.weight.detach().double().cpu())
            out.append(round(float(s[0] / s.median()), 2))
    return out


def _with_wq_a_output(model, layer: int, replace):
    """A forward hook on layers[layer].attn.wq_a that swaps its output for replace(out) in value while keeping
    the gradient path through the original output."""
    def hook(mod, inp, out):
        new = replace(out).to(out.dtype).reshape(out.shape)
        return out + (new - out).detach()
    return model.layers[layer].attn.wq_a.register_forward_hook(hook)


def sensitivity(models: dict, tokens, g32: dict, layer: int = 0, seed: int = 0) -> dict:
    """Is the FP8 error of one q_a (layer `layer`'s wq_a output) what moves the gradient?  In the fp32 model,
    replace that output by: the FP8 model's values; the same error rows shuffled across tokens; isotropic
    Gaussian noise of the same norm.  Returns each one's whole-gradient and embedding relative error."""
    seen = {}
    h = models["fp8"].layers[layer].attn.wq_a.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o.detach().float()))
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16):
        models["fp8"](tokens[:, :-1])
    h.remove()
    h = models["fp32"].layers[layer].attn.wq_a.register_forward_hook(lambda m, i, o: seen.__setitem__("q32", o.detach().float()))
    models["fp32"](tokens[:, :-1])
    h.remove()
    err = (seen["q"] - seen["q32"]).reshape(-1, seen["q"].shape[-1])
    gen = torch.Generator(device=err.device).manual_seed(seed)
    perm = torch.randperm(err.shape[0], generator=gen, device=err.device)
    noise = torch.randn(err.shape, generator=gen, device=err.device)
    variants = {"fp8 values": lambda out: seen["q"], "fp8 errors shuffled over tokens": lambda out: seen["q32"] + err[perm].reshape(out.shape),
                "isotropic noise, same norm": lambda out: seen["q32"] + (noise * err.norm() / noise.norm()).reshape(out.shape)}
    res = {"layer": layer, "q_a_rel_err": float(err.norm() / seen["q32"].norm())}
    for name, replace in variants.items():
        h = _with_wq_a_output(models["fp32"], layer, replace)
        g, _ = gradient(models["fp32"], tokens, None)
        h.remove()
        r = compare(g, g32)
        emb = float((g["embed.weight"] - g32["embed.weight"]).norm() / g32["embed.weight"].norm())
        res[name] = {"rel_err": r["rel_err"], "embed_rel_err": emb}
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warm", type=int, default=100, help="BF16 training steps before the probes")
    p.add_argument("--probes", type=int, default=2, help="batches the gradients are compared on")
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp8-scales", default="spec")
    p.add_argument("--keep", action="append", default=[],
                   help="an FP8 variant with these comma-separated module-name prefixes left BF16 (repeatable)")
    p.add_argument("--sensitivity", action="store_true",
                   help="also: layer 0's wq_a output in the fp32 model replaced by FP8's values, their errors shuffled, "
                        "or isotropic noise of the same norm (is FP8's q_a error what moves the gradient?)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-bytes", type=int, default=4 << 20)
    p.add_argument("--cache-dir", default="~/.cache/dsv3")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    args.steps = args.warm + args.probes
    dev = torch.device(args.device)
    cfg = ModelConfig.from_preset(args.preset)
    batches, data = batches_for(args, cfg, dev, args.seed)

    torch.manual_seed(args.seed)
    model = Transformer(cfg).to(dev).train()
    opt = build_optimizer(model, TrainConfig(lr=args.lr, weight_decay=0.1, grad_clip=1.0), dev)
    sched = LRSchedule(args.lr, args.warm // 10, max(args.warm, 1))
    for step in range(args.warm):
        for group in opt.param_groups:
            group["lr"] = sched.lr(step)
        _, loss = gradient(model, batches[step], torch.bfloat16)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0 or step == args.warm - 1:
            log(f"BF16 step {step}: loss {loss:.3f}, gradient norm {float(norm):.3f}")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    arms = {"bf16": ("bf16", ()), "fp8": ("fp8", ())}
    arms |= {f"fp8 keep {k}": ("fp8", tuple(x for x in k.split(",") if x)) for k in args.keep}
    models = {"fp32": model}
    for name, (precision, keep) in arms.items():
        m = Transformer(cfg).to(dev)
        m.load_state_dict(state)
        models[name] = prec.prepare_model(m, precision, args.fp8_scales, fp8_keep=keep).train()

    res = {"date": datetime.date.today().isoformat(), "commit": git_commit(), "device": args.device,
           "torch": torch.__version__, "preset": args.preset, "batch": args.batch, "seq": args.seq, "warm": args.warm,
           "lr": args.lr, "seed": args.seed, "fp8_scales": args.fp8_scales, "data": data,
           "wq_a_sigma1_over_median": wq_a_conditioning(model), "probes": []}
    for i in range(args.probes):
        tokens = batches[args.warm + i]
        g32, loss32 = gradient(models["fp32"], tokens, None)
        probe = {"loss_fp32": loss32, "arms": {}}
        for name, (precision, _) in arms.items():
            g, loss = gradient(models[name], tokens, prec.autocast_dtype(precision))
            probe["arms"][name] = {"loss": loss, **compare(g, g32)}
        if args.sensitivity:
            probe["sensitivity"] = sens = sensitivity(models, tokens, g32, seed=args.seed + i)
            log(f"probe {i} layer 0 q_a: FP8 error {sens['q_a_rel_err']:.4f} of its norm; in the fp32 model the embedding's "
                "gradient moves by " + ", ".join(f"{k} {v['embed_rel_err']:.3f}" for k, v in sens.items() if isinstance(v, dict)))
        res["probes"].append(probe)
        for name, r in probe["arms"].items():
            worst = ", ".join(f"{t['param']} {t['error_share']:.2f} (rel {t['rel_err']:.2f})" for t in r["top"][:3])
            log(f"probe {i} {name:24s} |g-g32|/|g32| {r['rel_err']:.3f}  cos {r['cos']:.4f}  |g|/|g32| "
                f"{r['norm_ratio']:.3f}  most error: {worst}")
    log(f"wq_a largest / median singular value per layer: {res['wq_a_sigma1_over_median']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"fp8_grad_error_{res['date']}.json"
    path.write_text(json.dumps(res, indent=1))
    log(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
