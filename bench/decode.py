"""Decode and prefill speed of the `bench` config on one GPU: dsv3's generator against Hugging Face's
`DeepseekV3ForCausalLM.generate`, in one job, plus MTP speculative decoding on a trained checkpoint.

Sections (each guarded: an error or the deadline skips it and is recorded, the rest still runs):
  env       device, versions, commit
  dsv3      decode tok/s at batch 1, 8, 64, 256: greedy, torch.compile'd steps in CUDA graphs (--no-compile:
            graphs only; and eagerly, for reference), random BF16 weights, fresh random prompts every
            repeat, as a fraction of the HBM roofline; `compile` and the warm-up's seconds per result
  gemv      (not in the default list) the dsv3 section again at the batches <= 8 with
            dsv3.inference.gemv.TRITON_GEMV flipped from its default (the decode step's dense projections
            through cuBLAS instead of the Triton kernel), so one job compares both end to end; results
            under `dsv3_triton_gemv_off` (or `_on` if the default is off)
  expert_major  (not in the default list) likewise with moe_small.EXPERT_MAJOR flipped, at the batches
            in the expert-major rule's range (E < N*K <= 16E: batch 8 and 64 of the bench config);
            under `dsv3_expert_major_off`
  new       (not in the default list) the kernels turned on 2026-12-01 (PAIR_GEMV, ROUTE_KERNEL) flipped
            together, one compile per batch <= 8; under `dsv3_new_kernels_flipped`.  The switch sections
            run at --switch-batches only, when given
  pair      (not in the default list) likewise with dsv3.inference.gemv.PAIR_GEMV flipped (wq_a + wkv_a and
            the shared w1 + w3 in one GEMV launch each), at the batches <= 8; under `dsv3_pair_gemv_off`
  route     (not in the default list) likewise with dsv3.inference.route_small.ROUTE_KERNEL flipped (routing
            in one Triton launch per MoE layer), at the batches <= 8; under `dsv3_route_kernel_off`
  route_split  (not in the default list) likewise with route_small.SPLIT_ROUTE flipped (the routing GEMV
            over 16 programs per token and a selecting launch), at the batches <= 8; under
            `dsv3_split_route_on`
  mla       (not in the default list) likewise with dsv3.inference.mla_decode.MLA_KERNEL flipped (absorbed
            attention in three Triton kernels, taken at <= 2 query rows; on by default since
            run 6), at the batches <= 8; under `dsv3_mla_kernel_off`
  latent    (not in the default list) likewise with dsv3.inference.latent_small.LATENT_KERNEL flipped (q_norm,
            kv_norm, k_pe's rope and the cache write in one Triton launch per MLA layer; on by default since
            run 10), at the batches <= 8; under `dsv3_latent_kernel_off`
  attn_norm (not in the default list) likewise with dsv3.inference.forward.ATTN_NORM_IN_GEMV flipped (the
            residual add and RMSNorm before wq_a + wkv_a in their pair GEMV's launch, taken at <= 2 rows),
            at the batches <= 8; under `dsv3_attn_norm_in_gemv_off`
  ffn_norm  likewise with forward.FFN_NORM_IN_ROUTE flipped (the residual add and RMSNorm before routing in
            the routing GEMV's launch); under `dsv3_ffn_norm_in_route_off`
  select    likewise with moe_small.SELECT_IN_EXPERTS flipped (the slot-major gate/up kernel selects each
            slot's expert from the routing GEMV's partials: no selecting launch); under
            `dsv3_select_in_experts_off` (on by default since run 12)
  pdl       likewise with dsv3.inference.triton_ops.PDL flipped (programmatic dependent launch between the
            decode kernels, at the batches <= PDL_MAX_ROWS; needs the opaque ops registered at import,
            DSV3_PDL unset); under `dsv3_pdl_off` (on by default since run 13, to 2 rows since run 14)
  fp8       (not in the default list) the same random weights saved as an FP8 checkpoint (e4m3, 128x128 scales,
            `save_pretrained(fp8=True)`) and decoded with them kept FP8 (`dsv3.fp8.load_fp8_for_inference`,
            `dsv3 generate --fp8-weights`), at every batch size; under `dsv3_fp8_weights`, with the speed-up
            over the BF16 result and the roofline at the bytes actually stored (FP8 linears 1 byte + scales,
            the rest 2); then, at the batches <= 8, with the few-row FP8 kernels' switches flipped from their
            defaults (on since run 26): gemv_fp8.FP8_GEMV under `dsv3_fp8_weights_fp8_gemv_off` (the experts'
            kernels alone), it and moe_small_fp8.FP8_SMALL_EXPERTS under
            `dsv3_fp8_weights_fp8_gemv_off_fp8_small_experts_off` (the training kernels' path), and
            gemv_fp8.WEIGHT_ONLY (x unquantised, W8A16, in the linears too) under `dsv3_fp8_weights_weight_only_on`
  profile   where a batch-1 step's device time goes: the compiled step launched without a graph under
            torch.profiler, kernels grouped by name (us and launches per step, the top 60)
  timeline  (not in the default list) the batch-1 step as CUDA-graph replays under the profiler: kernel
            time against the idle gaps between kernels inside the graph, per step (CUDA only)
  prefill   prompt tokens/s and MFU (batch x 2048 tokens into an empty cache)
  hf        transformers generate at the same batches; settings tried: static cache (which makes
            generate compile the forward) and the default dynamic cache, experts "grouped_mm" and
            "eager"; the fastest working setting at batch 1 is used, static falls back to dynamic
  mtp       greedy MTP speculative vs plain greedy at batch 1 and 32 on --mtp-ckpt: acceptance (overall
            and each sequence's min/median/max, `row_acceptance`), speed-up, tokens per step, outputs
            identical to plain greedy (skipped with a note when absent; --smoke uses a random tiny model
            instead, whose acceptance means nothing).  --mtp-temperature > 0 samples both sides, with MTP
            drafts sampled from the MTP head or (--mtp-drafts argmax) its argmax, the two's A/B

Timing: a warm-up run first (compiles, captures the graphs), then repeats, median; dsv3 times with
CUDA events.
dsv3's decode time is measured inside `Generator.generate` (first token to last, sampling and the
periodic host reads included).  HF's is the same span, stamped by a streamer as each step's tokens
reach the host (generate syncs every step anyway), so neither includes prefill.

Decode roofline (benchmarks.md): a decode step must read every weight it touches and the latent
cache, so at best
    bytes/step(B, S) = e * [N_active - L_moe*K*expert + L_moe*E_hit(B)*expert + B*d]  +  e * B*L*S*(r_kv + r_pe)
    E_hit(B)         = E * (1 - (1 - K/E)^B)      expected distinct routed experts of B tokens (uniform)
    roofline tok/s   = B / (bytes/step / 4.1e12)
N_active: matmul parameters one token touches (attention, dense FFN or shared + K routed experts,
router, lm_head; ModelConfig.active_matmul_params), expert = 3*d*I_moe, e = bytes per element (2 for
BF16), L layers, S the mean context during decode (prompt + new/2), r_kv + r_pe = 512 + 64, d*B the
embedding rows.  4.1 TB/s is the H200 device-to-device copy rate measured in benchmarks.md.
Prefill FLOPs: 2*(N_active - V*d) + L*T*H*(d_qk + d_v) per prompt token (causal attention forward)
+ 2*V*d per sequence (the head runs on the last token only); MFU against the peak by device name.

Prints a table and a final JSON line; writes decode_<date>.json into --out.  `--preset tiny --smoke`
runs tiny sizes on whatever device there is (CPU here) and writes nothing unless --out is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dsv3  # noqa: E402
from bench.common import T0, free, git_commit, log, sync, time_limit, timeline_stats  # noqa: E402
from dsv3 import ModelConfig, Transformer  # noqa: E402
from dsv3.inference import Generator, SamplingParams  # noqa: E402
from dsv3.inference.compiled import error_summary  # noqa: E402
from dsv3.inference import triton_ops  # noqa: E402
from dsv3.train.metrics import peak_flops  # noqa: E402

HBM_BYTES_PER_S = 4.1e12


# ------------------------------------------------------------------------------------------ roofline
def decode_bytes_per_step(cfg: ModelConfig, batch: int, context: float, elem_bytes: int) -> float:
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    hit = e * (1 - (1 - k / e) ** batch)
    weights = cfg.active_matmul_params() + cfg.num_moe_layers * (hit - k) * expert + batch * cfg.hidden_size
    cache = batch * cfg.num_layers * context * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    return elem_bytes * (weights + cache)


def roofline_tok_s(cfg: ModelConfig, batch: int, context: float, elem_bytes: int) -> float:
    return batch / (decode_bytes_per_step(cfg, batch, context, elem_bytes) / HBM_BYTES_PER_S)


def fp8_roofline_tok_s(model: Transformer, batch: int, context: float) -> float:
    """roofline_tok_s for a model from load_fp8_for_inference: the BF16 bytes less one byte per element of
    every e4m3 weight a step reads (the main layers' FP8 linears; the routed experts it hits, when they are
    FP8), plus their fp32 128x128 scales."""
    from dsv3.fp8.inference import FP8InferenceExperts, FP8InferenceLinear

    cfg = model.cfg
    main = [(n, m) for n, m in model.named_modules() if not n.startswith("mtp")]
    dense = sum(m.in_features * m.out_features for _, m in main if isinstance(m, FP8InferenceLinear))
    fp8_experts = any(isinstance(m, FP8InferenceExperts) for _, m in main)
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    hit = e * (1 - (1 - k / e) ** batch)
    experts = cfg.num_moe_layers * hit * 3 * cfg.hidden_size * cfg.moe_intermediate_size if fp8_experts else 0
    saved = (dense + experts) * (1 - 4 / 128 ** 2)  # one byte per element, less a 4-byte scale per 128x128 block
    return batch / ((decode_bytes_per_step(cfg, batch, context, 2) - saved) / HBM_BYTES_PER_S)


def prefill_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
    head = cfg.vocab_size * cfg.hidden_size
    attn = cfg.num_layers * seq * cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return batch * seq * (2 * (cfg.active_matmul_params() - head) + attn) + batch * 2 * head


# ------------------------------------------------------------------------------------------ systems
def build_dsv3(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> Transformer:
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    return model.to(dtype).eval()


def build_hf(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, experts: str):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    d = cfg.to_hf_config(torch_dtype="bfloat16")
    d = {k: v for k, v in d.items() if k not in ("architectures", "model_type", "torch_dtype", "rope_scaling")}
    d["num_nextn_predict_layers"] = 0
    torch.manual_seed(0)
    with torch.device(device):
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**d, attn_implementation="sdpa", experts_implementation=experts))
    return model.to(dtype).eval()


class Prompts:
    """Fresh prompts for every run: random token ids, or random windows of a token stream (real text)."""

    def __init__(self, vocab: int, seed: int = 1234, stream: list[int] | None = None):
        self.vocab, self.stream = vocab, stream
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, batch: int, length: int) -> list[list[int]]:
        if self.stream is None:
            return torch.randint(8, self.vocab, (batch, length), generator=self.g).tolist()  # past the special ids
        starts = torch.randint(0, len(self.stream) - length, (batch,), generator=self.g).tolist()
        return [self.stream[s:s + length] for s in starts]


def dsv3_decode(model: Transformer, batch: int, args, prompts: Prompts, cuda_graphs: bool, compile: bool | None) -> dict:
    gen = Generator(model, cuda_graphs=cuda_graphs, compile=compile)
    run = lambda: gen.generate(prompts(batch, args.prompt_len), max_new_tokens=args.new_tokens, stop_ids=[])  # noqa: E731
    t0 = time.perf_counter()
    run()  # warm-up: compiles (first batch of each kind: 1 or more), captures every kv_len bucket's graph
    warmup_s = time.perf_counter() - t0
    outs = [run() for _ in range(args.repeats)]
    tok_s = statistics.median(o.decode_tok_s for o in outs)
    context = args.prompt_len + args.new_tokens / 2
    roof = roofline_tok_s(model.cfg, batch, context, model.head.weight.element_size())
    return {"batch": batch, "tok_s": round(tok_s, 1), "ms_per_step": round(1e3 * batch / tok_s, 3),
            "roofline_tok_s": round(roof, 1), "roofline_fraction": round(tok_s / roof, 4),
            "cuda_graphs": bool(cuda_graphs and gen.decode_runner.enabled), "compile": gen.compiled,
            "warmup_s": round(warmup_s, 1), "repeats": args.repeats}


def decode_with_switch(model: Transformer, batch: int, args, prompts: Prompts, compile: bool | None,
                       switches: list[tuple[object, str]]) -> dict:
    """dsv3_decode with each module.<switch> (a kernel choice, e.g. gemv.TRITON_GEMV) flipped from its
    default, so one job times both sides end to end; dynamo's caches are reset around it (the switches
    are read when a step is traced)."""
    defaults = [getattr(module, switch) for module, switch in switches]
    torch._dynamo.reset()
    for (module, switch), default in zip(switches, defaults):
        setattr(module, switch, not default)
    try:
        return dsv3_decode(model, batch, args, prompts, cuda_graphs=True, compile=compile)
    finally:
        for (module, switch), default in zip(switches, defaults):
            setattr(module, switch, default)
        torch._dynamo.reset()


def fp8_weights_decode(model: Transformer, batch: int, args, prompts: Prompts, compile: bool | None,
                       switches: list[tuple[object, str]] | None = None) -> dict:
    """dsv3_decode (decode_with_switch with switches) of an FP8-weight model (fp8_section), its roofline at the
    bytes it stores."""
    r = (decode_with_switch(model, batch, args, prompts, compile, switches) if switches
         else dsv3_decode(model, batch, args, prompts, cuda_graphs=True, compile=compile))
    roof = fp8_roofline_tok_s(model, batch, args.prompt_len + args.new_tokens / 2)
    return r | {"roofline_tok_s": round(roof, 1), "roofline_fraction": round(r["tok_s"] / roof, 4)}


def load_fp8_copy(model: Transformer, device: torch.device, dtype: torch.dtype) -> Transformer:
    """model saved as an FP8 checkpoint (as DeepSeek ships V3) and loaded back with its e4m3 weights kept."""
    import tempfile

    from dsv3.fp8 import load_fp8_for_inference

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, fp8=True)
        return load_fp8_for_inference(tmp, device=device, dtype=dtype)


def fp8_section(model: Transformer, batches: list[int], args, prompts: Prompts, device: torch.device, dtype: torch.dtype,
                compile: bool | None, res: dict, guarded) -> None:
    """The `fp8` section: model as an FP8 checkpoint, decoded with its e4m3 weights at every batch size."""
    fp8_model = guarded("fp8:load", lambda: load_fp8_copy(model, device, dtype))
    if fp8_model is None:
        return
    for b in batches:
        r = guarded(f"fp8:bs{b}", lambda: fp8_weights_decode(fp8_model, b, args, prompts, compile))
        if r:
            bf16 = res["dsv3"].get(str(b), {}).get("tok_s")
            r["speedup_vs_bf16"] = round(r["tok_s"] / bf16, 3) if bf16 else None
            res.setdefault("dsv3_fp8_weights", {})[str(b)] = r
            log(f"dsv3 bs{b}, FP8 weights: {r['tok_s']} tok/s ({r['speedup_vs_bf16']}x BF16), "
                f"{100 * r['roofline_fraction']:.1f} % of its roofline ({r['roofline_tok_s']} tok/s)")
    from dsv3.inference import gemv_fp8, moe_small_fp8

    # the few-row FP8 kernels' switches flipped: the linears' (at most 8 rows), both (the training kernels'
    # path), and the weight-only form; each result named by the flipped state
    flips = [[(gemv_fp8, "FP8_GEMV")], [(gemv_fp8, "FP8_GEMV"), (moe_small_fp8, "FP8_SMALL_EXPERTS")],
             [(gemv_fp8, "WEIGHT_ONLY")]]
    for switches in flips:
        name = "_".join(f"{switch.lower()}_{'off' if getattr(module, switch) else 'on'}" for module, switch in switches)
        key = f"dsv3_fp8_weights_{name}"
        for b in [b for b in batches if b <= 8]:
            r = guarded(f"fp8:{name}:bs{b}", lambda: fp8_weights_decode(fp8_model, b, args, prompts, compile, switches))
            if r:
                res.setdefault(key, {})[str(b)] = r
                log(f"dsv3 bs{b}, FP8 weights, {key.removeprefix('dsv3_fp8_weights_')}: {r['tok_s']} tok/s, "
                    f"{100 * r['roofline_fraction']:.1f} % of its roofline")


def kernel_profile(model: Transformer, args, prompts: Prompts, device: torch.device, compile: bool | None,
                   steps: int = 8, top: int = 60) -> dict:
    """Where a batch-1 decode step's device time goes.  The step runs compiled as in the dsv3 section but
    launched without a CUDA graph (the same kernels, which the profiler then sees one by one); kernels
    are grouped by name.  On a CPU: operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    gen = Generator(model, cuda_graphs=False, compile=(device.type == "cuda") if compile is None else compile)
    prompt = prompts(1, args.prompt_len)
    with torch.no_grad():
        gen.reserve(1, args.prompt_len + steps + 4)
        _, _, logits = gen.prefill(prompt)
        pending = logits.argmax(-1, keepdim=True)  # [1, 1]: the same token every step (speed only)

        def step(i: int) -> None:
            gen.decode_runner(gen.kv_len(args.prompt_len + i + 1), pending, gen.cache.lengths.unsqueeze(1))
            gen.cache.lengths += 1

        for i in range(2):  # compiles
            step(i)
        sync(device)
        cuda = device.type == "cuda"
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for i in range(2, 2 + steps):
                step(i)
            sync(device)
    totals: dict[str, list[float]] = {}
    if cuda:
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                t = totals.setdefault(e.name, [0.0, 0])
                t[0] += e.device_time
                t[1] += 1
    else:
        for e in prof.key_averages():
            totals[e.key] = [e.self_cpu_time_total, e.count]
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])
    return {"batch": 1, "steps": steps, "compiled": gen.compiled, "what": "CUDA kernels" if cuda else "CPU operators",
            "per_step": round(sum(c for _, c in totals.values()) / steps, 1),
            "us_per_step": round(sum(t for t, _ in totals.values()) / steps, 1),
            "top": [{"name": n[:100], "us_per_step": round(t / steps, 1), "per_step": round(c / steps, 2)}
                    for n, (t, c) in rows[:top]]}


def graph_timeline(model: Transformer, args, prompts: Prompts, device: torch.device, compile: bool | None,
                   steps: int = 8) -> dict:
    """The batch-1 decode step as the dsv3 section runs it (compiled, CUDA-graph replays) under the
    profiler: per step, kernel time against the idle time between kernels inside the graph (what
    kernel_profile, launched without a graph, cannot show).  CUDA only."""
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        return {"skipped": "CUDA only"}
    gen = Generator(model, cuda_graphs=True, compile=True if compile is None else compile)
    prompt = prompts(1, args.prompt_len)
    with torch.no_grad():
        gen.reserve(1, args.prompt_len + steps + 4)
        _, _, logits = gen.prefill(prompt)
        pending = logits.argmax(-1, keepdim=True)

        def step(i: int) -> None:
            gen.decode_runner(gen.kv_len(args.prompt_len + i + 1), pending, gen.cache.lengths.unsqueeze(1))
            gen.cache.lengths += 1

        for i in range(2):  # compiles and captures
            step(i)
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(2, 2 + steps):
                step(i)
            sync(device)
    kernels = [(e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"compiled": gen.compiled, "graphs": True, **timeline_stats(kernels, steps)}


def generation_profile(gen: Generator, prompt, steps_of, top: int = 25, **kw) -> dict:
    """One whole generation (as timed: graphs, compiled steps) under the profiler, per decode step:
    kernel time by name, and the step's wall span against its kernels and the gaps between them (a span
    well above kernels + gaps means the GPU waited for the host).  steps_of(output) -> decode steps.
    CUDA only.  What the MTP section records to say where a speculative step's cost goes."""
    from torch.profiler import ProfilerActivity, profile

    if gen.device.type != "cuda":
        return {"skipped": "CUDA only"}
    gen.generate(prompt, **kw)  # warm: every graph captured
    sync(gen.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = gen.generate(prompt, **kw)
        sync(gen.device)
    steps = max(steps_of(out), 1)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    totals: dict[str, list[float]] = {}
    for e in kernels:
        t = totals.setdefault(e.name, [0.0, 0])
        t[0] += e.device_time
        t[1] += 1
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])
    # the prefill's kernels are in the totals too (spread over the steps); decode_us_per_step is the engine's
    # own first-to-last-token time per step
    return {"steps": steps, "decode_us_per_step": round(out.decode_s / steps * 1e6, 1),
            **timeline_stats([(e.time_range.start, e.time_range.end) for e in kernels], steps),
            "top": [{"name": n[:100], "us_per_step": round(t / steps, 1), "per_step": round(c / steps, 2)}
                    for n, (t, c) in rows[:top]]}


def dsv3_prefill(model: Transformer, args, prompts: Prompts, device: torch.device) -> dict:
    gen = Generator(model)
    b, t = args.prefill_batch, args.prefill_len
    run = lambda: gen.generate(prompts(b, t), max_new_tokens=1, stop_ids=[]).prefill_s  # noqa: E731
    run()
    s = statistics.median(run() for _ in range(args.repeats))
    flops = prefill_flops(model.cfg, b, t)
    peak = peak_flops(device, "bf16") if model.head.weight.dtype == torch.bfloat16 else None
    return {"batch": b, "seq": t, "tok_s": round(b * t / s, 1), "tflops": round(flops / s / 1e12, 2),
            "mfu": round(flops / s / peak, 4) if peak else None, "attn_impl": model.layers[0].attn.attn_impl}


class TokenClock:
    """A transformers streamer that only notes when each step's tokens arrive (generate reads them to
    the host every step anyway).  put #0 is the prompt, put #1 the first new token."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_decode(model, batch: int, args, prompts: Prompts, device: torch.device, cache: str) -> dict:
    def run() -> float:
        """Seconds per decode step: from the first new token to the last."""
        ids = torch.tensor(prompts(batch, args.prompt_len), device=device)
        clock = TokenClock()
        kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
                  attention_mask=torch.ones_like(ids), streamer=clock)
        if cache == "static":
            kw["cache_implementation"] = "static"
        with torch.no_grad():
            model.generate(ids, **kw)
        sync(device)
        return (clock.stamps[-1] - clock.stamps[1]) / (len(clock.stamps) - 2)

    run()  # warm-up (compiles with the static cache)
    tok_s = batch / statistics.median(run() for _ in range(args.repeats))
    context = args.prompt_len + args.new_tokens / 2
    roof = roofline_tok_s(args.cfg, batch, context, model.lm_head.weight.element_size())
    return {"batch": batch, "tok_s": round(tok_s, 1), "roofline_fraction": round(tok_s / roof, 4)}


def hf_section(args, batches: list[int], prompts: Prompts, device: torch.device, dtype: torch.dtype, res: dict, guarded) -> None:
    """Tries each --hf-settings pair at the first batch size, then runs the others with the fastest."""
    best, probes = None, {}
    for cache, experts in (s.split(":") for s in args.hf_settings.split(",")):
        def probe(cache=cache, experts=experts):
            m = build_hf(args.cfg, device, dtype, experts)
            return m, hf_decode(m, batches[0], args, prompts, device, cache)
        got = guarded(f"hf:{cache}:{experts}", probe, budget=240 if cache == "static" else None)  # compiling can stall
        if got:
            probes[f"{cache}:{experts}"] = got[1]["tok_s"]
            log(f"hf {cache} cache, experts {experts}, bs{batches[0]}: {got[1]['tok_s']} tok/s")
            if best is None or got[1]["tok_s"] > best[2]["tok_s"]:
                best = (got[0], cache, got[1])
        del got
        free(device)
    res["hf_probes"] = probes
    if best is None:
        return
    model, cache, first = best
    res["hf_setting"] = f"{cache} cache, experts {model.config._experts_implementation}"
    res["hf"][str(batches[0])] = first
    for b in batches[1:]:
        r = guarded(f"hf:bs{b}", lambda: hf_decode(model, b, args, prompts, device, cache))
        if r is None and cache == "static":  # e.g. a compile failure at a new batch size
            r = guarded(f"hf:bs{b}:dynamic", lambda: hf_decode(model, b, args, prompts, device, "dynamic"))
        if r:
            res["hf"][str(b)] = r
            log(f"hf bs{b}: {r['tok_s']} tok/s")


# ------------------------------------------------------------------------------------------ MTP
def text_stream(tokenizer, chars: int = 400_000) -> list[int]:
    """Python standard-library source as token ids: in-distribution for the built-in demo corpus."""
    text, lib = [], Path(os.__file__).parent
    for f in sorted(lib.glob("*.py")):
        text.append(f.read_text(encoding="utf-8", errors="ignore"))
        if sum(map(len, text)) > chars:
            break
    return tokenizer.encode("".join(text))


def pooled_tok_s(outputs, prefill: bool) -> float:
    """Tokens per second over several generations together: with prefill (every new token over the whole
    time) or the decode phase alone (the tokens after each sequence's first, over first-to-last time)."""
    if prefill:
        return sum(o.new_tokens for o in outputs) / sum(o.prefill_s + o.decode_s for o in outputs)
    decode_s = sum(o.decode_s for o in outputs)
    return sum(o.new_tokens - len(o.tokens) for o in outputs) / decode_s if decode_s else 0.0


def mtp_section(args, device: torch.device, dtype: torch.dtype, res: dict, save) -> None:
    """Greedy speculative against plain decoding per MTP batch; res["mtp"] is saved after each batch (a job's
    time limit may stop the next one)."""
    from dsv3.data.tokenizer import Tokenizer

    if args.mtp_ckpt:
        model = dsv3.from_pretrained(args.mtp_ckpt, device=device, dtype=dtype)
        source = f"checkpoint {args.mtp_ckpt}"
    elif args.smoke:
        model, source = build_dsv3(args.cfg.replace(num_mtp_layers=1), device, dtype), "random weights (smoke: acceptance is meaningless)"
    else:
        res["mtp"] = {"note": "skipped: no --mtp-ckpt given (a checkpoint trained with MTP depth >= 1)"}
        log(res["mtp"]["note"])
        return
    if not model.cfg.num_mtp_layers:
        res["mtp"] = {"note": f"skipped: {args.mtp_ckpt} has no MTP layer"}
        return
    stream = None
    if args.mtp_ckpt and (Path(args.mtp_ckpt) / "tokenizer.json").is_file():
        stream = text_stream(Tokenizer.load(args.mtp_ckpt))
    prompts = Prompts(model.cfg.vocab_size, seed=99, stream=stream)
    from dsv3.inference import speculative as spec_mod

    spec_mod.SAMPLED_DRAFTS = args.mtp_drafts == "sampled"
    out = {"source": source, "prompts": "stdlib source windows" if stream else "random tokens", "num_draft": args.num_draft,
           "temperature": args.mtp_temperature, "drafts": "greedy" if not args.mtp_temperature else args.mtp_drafts}
    sampling = SamplingParams(temperature=args.mtp_temperature, seed=0)
    for batch in args.mtp_batches:
        gen = Generator(model, cuda_graphs=device.type == "cuda", compile=False if args.no_compile else None)
        kw = dict(max_new_tokens=args.new_tokens, stop_ids=[], sampling=sampling)
        gen.generate(prompts(batch, args.prompt_len), **kw)
        gen.generate(prompts(batch, args.prompt_len), speculative=True, num_draft=args.num_draft, **kw)
        plain, spec, same = [], [], []
        for _ in range(args.repeats):
            p = prompts(batch, args.prompt_len)
            a, b = gen.generate(p, **kw), gen.generate(p, speculative=True, num_draft=args.num_draft, **kw)
            plain.append(a)
            spec.append(b)
            same.append(sum(x == y for x, y in zip(a.tokens, b.tokens)) / batch)
        acc = sum(s.accepted for s in spec) / max(sum(s.drafted for s in spec), 1)
        # per sequence: a static batch steps until its slowest sequence is done
        rows = sorted(a / d for s in spec for a, d in zip(s.accepted_per_sequence, s.drafted_per_sequence) if d)
        # pooled over the repeats, as the acceptance is (a median speed beside a pooled acceptance paired
        # figures from different prompts): whole generation (prefill included), so both sides count the
        # same tokens, and the decode phase alone (first token to last), as the dsv3 and hf sections time it
        tp, ts = pooled_tok_s(plain, prefill=True), pooled_tok_s(spec, prefill=True)
        dp, ds = pooled_tok_s(plain, prefill=False), pooled_tok_s(spec, prefill=False)
        per_run = [{"acceptance": round(b.acceptance_rate, 4) if b.drafted else None, "speedup": round(b.decode_tok_s / a.decode_tok_s, 3) if a.decode_tok_s else None}
                   for a, b in zip(plain, spec)]
        out[f"bs{batch}"] = {"acceptance": round(acc, 4), "plain_tok_s": round(tp, 1), "spec_tok_s": round(ts, 1),
                             "plain_decode_tok_s": round(dp, 1), "spec_decode_tok_s": round(ds, 1),
                             "decode_speedup": round(ds / dp, 3) if dp else None, "compile": gen.compiled_steps,
                             "speedup": round(ts / tp, 3), "identical_outputs": round(statistics.mean(same), 3) if sampling.greedy else None,
                             # committed tokens per sequence and step, the prefill's first token left out
                             "tokens_per_step": round(sum(b.new_tokens - batch for b in spec) / (batch * sum(b.steps for b in spec)), 3),
                             "per_run_decode": per_run, "pooled_over_runs": args.repeats,
                             "row_acceptance": {"min": round(rows[0], 4), "median": round(statistics.median(rows), 4),
                                                "max": round(rows[-1], 4)} if rows else None}
        from dsv3.inference import engine as engine_mod, speculative as spec_mod

        helper = spec_mod._greedy_step_compiled if sampling.greedy else spec_mod._sampled_step_compiled
        plain_helper = engine_mod._greedy_advance_compiled if sampling.greedy else engine_mod._sampled_advance_compiled
        out[f"bs{batch}"]["bookkeeping_compiled"] = {"speculative": helper.compiled is not None,
                                                     "plain": plain_helper.compiled is not None}
        if not sampling.greedy and spec_mod.SAMPLED_DRAFTS:  # the sampled draft's choice (q and its draw) between the draft graph and the next verify
            out[f"bs{batch}"]["bookkeeping_compiled"]["draft_choice"] = spec_mod._draft_choice_compiled.compiled is not None
        if batch == 1:  # where a speculative step's time goes, against a plain one's (CUDA only)
            p = prompts(batch, args.prompt_len)
            out[f"bs{batch}"]["profile"] = {
                "plain": generation_profile(gen, p, lambda o: o.steps, **kw),
                "speculative": generation_profile(gen, p, lambda o: o.steps, speculative=True,
                                                  num_draft=args.num_draft, **kw)}
            pp, sp = out[f"bs{batch}"]["profile"]["plain"], out[f"bs{batch}"]["profile"]["speculative"]
            if "skipped" not in pp:
                log(f"mtp bs{batch} profile: plain step {pp['span_us_per_step']} us ({pp['kernel_us_per_step']} us kernels, "
                    f"{pp['gap_us_per_step']} us gaps; engine {pp['decode_us_per_step']} us), speculative step "
                    f"{sp['span_us_per_step']} us ({sp['kernel_us_per_step']} us kernels, {sp['gap_us_per_step']} us gaps; "
                    f"engine {sp['decode_us_per_step']} us)")
        if not all(gen.compiled_steps.values()):
            log(f"mtp bs{batch}: WARNING, steps fell back to eager: {gen.compiled_steps} (the speed-up is not comparable)")
        log(f"mtp bs{batch}: acceptance {acc:.1%} (per sequence {rows[0]:.1%} to {rows[-1]:.1%}), "
            f"{tp:.1f} -> {ts:.1f} tok/s ({ts / tp:.2f}x; decode phase alone {dp:.1f} -> {ds:.1f}, "
            f"{ds / dp if dp else float('nan'):.2f}x)" if rows else f"mtp bs{batch}: nothing drafted")
        res["mtp"] = out
        save()
    del model
    free(device)


# ------------------------------------------------------------------------------------------ main
def table(res: dict) -> str:
    rows = [("batch", "dsv3 tok/s", "graphs", "compile", "roofline", "dsv3 eager tok/s", "HF tok/s", "vs HF")]
    for b in res["batch_sizes"]:
        d, e, h = res["dsv3"].get(str(b), {}), res["dsv3_eager"].get(str(b), {}), res["hf"].get(str(b), {})
        ratio = f"{d['tok_s'] / h['tok_s']:.1f}x" if d.get("tok_s") and h.get("tok_s") else "-"
        rows.append((str(b), str(d.get("tok_s", "-")), "yes" if d.get("cuda_graphs") else "no", "yes" if d.get("compile") else "no",
                     f"{100 * d['roofline_fraction']:.1f} %" if d else "-",
                     str(e.get("tok_s", "-")), str(h.get("tok_s", "-")), ratio))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  python bench/decode.py --mtp-ckpt runs/mtp/final\n"
                                       "  python bench/decode.py --preset tiny --smoke")
    p.add_argument("--preset", default="bench")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and few tokens on any device; writes nothing without --out")
    p.add_argument("--out", default=None, help="results folder (default bench/results; none with --smoke)")
    p.add_argument("--mtp-ckpt", default=None, help="checkpoint with an MTP layer for the speculative section")
    p.add_argument("--sections", default="dsv3,profile,prefill,hf,mtp,dsv3_eager", help="which to run (env always runs)")
    p.add_argument("--batch-sizes", default="1,8,64,256")
    p.add_argument("--mtp-batches", default="1,32")
    p.add_argument("--switch-batches", default=None,
                   help="comma-separated: the batches the switch sections (gemv, pair, route, mla, new, ...) run at "
                        "(default: every batch in each one's range)")
    p.add_argument("--num-draft", type=int, default=1)
    p.add_argument("--mtp-temperature", type=float, default=0.0,
                   help="MTP section: 0 is greedy (outputs must equal plain greedy); above 0 both sides sample "
                        "(speculative sampling), which keeps a briefly trained model out of the repetitive loops "
                        "that make greedy acceptance a property of the loop")
    p.add_argument("--mtp-drafts", choices=["sampled", "argmax"], default="sampled",
                   help="MTP section with --mtp-temperature > 0: drafts sampled from the MTP head (the default) or its "
                        "argmax (the form before 2026-12-02), to compare their acceptance on one checkpoint")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-batch", type=int, default=8)
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hf-settings", default="static:grouped_mm,dynamic:grouped_mm,dynamic:eager",
                   help="cache:experts pairs tried at batch 1 (the fastest that works is used)")
    p.add_argument("--no-compile", action="store_true",
                   help="dsv3 and mtp sections: CUDA graphs without torch.compile (the default compiles the steps first)")
    p.add_argument("--deadline", type=float, default=540, help="seconds; sections after it are skipped")
    p.add_argument("--pdl-max-rows", type=int, default=None,
                   help="launches over at most this many rows go with programmatic dependent launch (default: "
                        "dsv3.inference.triton_ops.PDL_MAX_ROWS); e.g. 8 to time PDL at batch 8")
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.smoke:
        args.batch_sizes, args.mtp_batches = "1,4", "1,2"
        args.prompt_len, args.new_tokens, args.prefill_batch, args.prefill_len, args.repeats = 16, 8, 2, 64, 2
        if device.type == "cpu":
            args.hf_settings = "dynamic:eager"
            torch.set_num_threads(1)  # tiny matmuls on a shared CPU: OpenMP spin-waiting makes timings erratic
    if args.pdl_max_rows is not None:
        triton_ops.PDL_MAX_ROWS = args.pdl_max_rows
    args.cfg = ModelConfig.from_preset(args.preset).replace(num_mtp_layers=0)  # peers are compared without MTP
    batches = [int(b) for b in args.batch_sizes.split(",")]
    args.mtp_batches = [int(b) for b in args.mtp_batches.split(",")]
    args.switch_batches = [int(b) for b in args.switch_batches.split(",")] if args.switch_batches else None
    sections, deadline = args.sections.split(","), T0 + args.deadline
    date = datetime.date.today().isoformat()
    res: dict = {"date": date, "commit": args.commit or git_commit(), "preset": args.preset, "smoke": args.smoke,
                 "dtype": str(dtype).removeprefix("torch."), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                 "batch_sizes": batches, "hbm_bytes_per_s": HBM_BYTES_PER_S, "dsv3": {}, "dsv3_eager": {}, "hf": {},
                 "errors": {}}
    out_dir = Path(args.out) if args.out else (None if args.smoke else ROOT / "bench" / "results")

    def save() -> None:
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"decode_{date}{'_smoke' if args.smoke else ''}.json").write_text(json.dumps(res, indent=1) + "\n")

    def guarded(name: str, fn, budget: float | None = None):
        """Runs one section until the deadline (or its own budget); records an error instead of stopping."""
        if name != "env" and name.split(":")[0] not in sections:
            return None
        left = deadline - time.time()
        try:
            with time_limit(min(left, budget) if budget else left):
                return fn()
        except Exception as e:
            res["errors"][name] = error_summary(e)
            log(f"{name} FAILED: {res['errors'][name]}")
            if not isinstance(e, TimeoutError):
                traceback.print_exc()
            free(device)
            return None
        finally:
            save()

    def env() -> None:
        import importlib.metadata as md

        res["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        res["torch"] = torch.__version__
        res["transformers"] = md.version("transformers")
        # the decode kernels' programmatic dependent launch: on (DSV3_PDL unset), at launches over <= max rows
        res["pdl"], res["pdl_max_rows"] = triton_ops.PDL, triton_ops.PDL_MAX_ROWS
        log(f"{res['device']}, torch {res['torch']}, transformers {res['transformers']}, commit {res['commit']}, "
            f"preset {args.preset} ({str(dtype)}), prompt {args.prompt_len} + {args.new_tokens} new tokens")

    guarded("env", env)
    res.setdefault("device", "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device))
    prompts = Prompts(args.cfg.vocab_size)
    model = build_dsv3(args.cfg, device, dtype)
    compile_steps = False if args.no_compile else None  # None: with the CUDA graphs (so not on a CPU)
    for b in batches:
        r = guarded(f"dsv3:bs{b}", lambda: dsv3_decode(model, b, args, prompts, cuda_graphs=True, compile=compile_steps))
        if r:
            res["dsv3"][str(b)] = r
            log(f"dsv3 bs{b}: {r['tok_s']} tok/s, {100 * r['roofline_fraction']:.1f} % of roofline "
                f"({r['roofline_tok_s']} tok/s), graphs {r['cuda_graphs']}, compile {r['compile']} (warm-up {r['warmup_s']} s)")
    from dsv3.inference import forward, gemv, latent_small, mla_decode, moe_small, route_small

    cfg = args.cfg
    experts_k, experts_e = cfg.num_experts_per_tok, cfg.n_routed_experts
    few = [b for b in batches if b <= gemv.MAX_ROWS]
    new_kernels = [(gemv, "PAIR_GEMV"), (route_small, "ROUTE_KERNEL")]
    switched = [("gemv", [(gemv, "TRITON_GEMV")], few), ("pair", [(gemv, "PAIR_GEMV")], few),
                ("expert_major", [(moe_small, "EXPERT_MAJOR")],
                 [b for b in batches if experts_e < experts_k * b <= moe_small.EXPERT_MAJOR_MAX_SLOTS_PER_EXPERT * experts_e]),
                ("route", [(route_small, "ROUTE_KERNEL")], few), ("route_split", [(route_small, "SPLIT_ROUTE")], few),
                ("mla", [(mla_decode, "MLA_KERNEL")], few), ("latent", [(latent_small, "LATENT_KERNEL")], few),
                ("attn_norm", [(forward, "ATTN_NORM_IN_GEMV")], few), ("ffn_norm", [(forward, "FFN_NORM_IN_ROUTE")], few),
                ("select", [(moe_small, "SELECT_IN_EXPERTS")], [b for b in few if b * experts_k <= experts_e]),
                ("pdl", [(triton_ops, "PDL")], [b for b in few if b <= triton_ops.PDL_MAX_ROWS]),
                ("new", new_kernels, few)]
    for section, switches, sizes in switched:
        if section == "new":
            key = "dsv3_new_kernels_flipped"
        else:
            (module, switch), = switches
            key = f"dsv3_{switch.lower()}_{'off' if getattr(module, switch) else 'on'}"
        for b in sizes:
            if args.switch_batches and b not in args.switch_batches:
                continue
            r = guarded(f"{section}:bs{b}", lambda: decode_with_switch(model, b, args, prompts, compile_steps, switches))
            if r:
                res.setdefault(key, {})[str(b)] = r
                log(f"dsv3 bs{b}, {key.removeprefix('dsv3_')}: {r['tok_s']} tok/s, {100 * r['roofline_fraction']:.1f} % of roofline")
    fp8_section(model, batches, args, prompts, device, dtype, compile_steps, res, guarded)
    free(device)  # the FP8 copy, gone with the section's frame
    r = guarded("profile", lambda: kernel_profile(model, args, prompts, device, compile_steps))
    if r:
        res["profile_bs1"] = r
        log(f"profile bs1 ({'compiled' if r['compiled'] else 'not compiled'}): {r['per_step']} {r['what']} per step, "
            f"{r['us_per_step']} us per step; top: " + "; ".join(f"{x['us_per_step']} us {x['name'][:60]}" for x in r["top"][:8]))
    r = guarded("timeline", lambda: graph_timeline(model, args, prompts, device, compile_steps))
    if r:
        res["timeline_bs1"] = r
        if "skipped" not in r:
            log(f"timeline bs1 (graph replays): {r['kernels_per_step']} kernels, {r['kernel_us_per_step']} us of kernels "
                f"and {r['gap_us_per_step']} us of gaps (median {r['median_gap_us']} us) per step; "
                f"{r['between_steps_us']} us between steps")
    r = guarded("prefill", lambda: dsv3_prefill(model, args, prompts, device))
    if r:
        res["prefill"] = r
        log(f"prefill {r['batch']}x{r['seq']}: {r['tok_s']} tok/s, {r['tflops']} TFLOP/s, MFU {r['mfu']}")
    guarded("mtp", lambda: mtp_section(args, device, dtype, res, save))
    if "hf" in sections:
        hf_section(args, batches, prompts, device, dtype, res, guarded)
    for b in batches:
        r = guarded(f"dsv3_eager:bs{b}", lambda: dsv3_decode(model, b, args, prompts, cuda_graphs=False, compile=False))
        if r:
            res["dsv3_eager"][str(b)] = r
            log(f"dsv3 eager bs{b}: {r['tok_s']} tok/s")

    # ---- summary
    d1, h1 = res["dsv3"].get("1", {}), res["hf"].get("1", {})
    mtp = res.get("mtp", {})
    # MTP speed-ups of the decode phase (first token to last), as DeepSeek's and SGLang's figures are;
    # the *_with_prefill ones time whole generations
    res.update({
        "bs1_tok_s": d1.get("tok_s"), "bs1_roofline_fraction": d1.get("roofline_fraction"),
        "bs1_speedup_vs_hf": round(d1["tok_s"] / h1["tok_s"], 3) if d1 and h1 else None,
        "mtp_acceptance": mtp.get("bs1", {}).get("acceptance"),
        "mtp_speedup_bs1": mtp.get("bs1", {}).get("decode_speedup"),
        "mtp_speedup_bs32": mtp.get("bs32", {}).get("decode_speedup"),
        "mtp_speedup_bs1_with_prefill": mtp.get("bs1", {}).get("speedup"),
        "mtp_speedup_bs32_with_prefill": mtp.get("bs32", {}).get("speedup"),
        "wall_s": round(time.time() - T0, 1),
    })
    save()
    print()
    print(table(res))
    keys = ("device", "date", "commit", "torch", "transformers", "preset", "dtype", "pdl", "pdl_max_rows", "bs1_tok_s", "bs1_roofline_fraction",
            "bs1_speedup_vs_hf", "hf_setting", "mtp_acceptance", "mtp_speedup_bs1", "mtp_speedup_bs32",
            "mtp_speedup_bs1_with_prefill", "mtp_speedup_bs32_with_prefill", "errors")
    summary = {k: res.get(k) for k in keys}
    summary["decode_tok_s"] = {b: r["tok_s"] for b, r in res["dsv3"].items()}
    summary["hf_tok_s"] = {b: r["tok_s"] for b, r in res["hf"].items()}
    summary["prefill"] = res.get("prefill")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
