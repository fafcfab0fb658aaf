"""Batched generation: prefill prompts of different lengths, then decode over the latent cache.

    gen = Generator(model)                          # cuda_graphs=True on a GPU for fast decoding (compiles too)
    out = gen.generate([[0, 17, 42], [0, 5]], max_new_tokens=64,
                       sampling=SamplingParams(temperature=0.7, top_p=0.95, seed=0))
    out.tokens        # new tokens per sequence, stop token excluded
    out.finish_reasons, out.decode_tok_s, out.acceptance_rate (speculative=True)

Prefill: prompts are right-padded to the longest; every token sits at its true position (slot = position),
so padding only fills slots past a sequence's length, which its queries never see (cache.causal_mask).
Prefill runs the expanded attention causally over the fresh latents and reads each sequence's logits
at its own last prompt token.  Decode: one token per sequence per step, absorbed attention over the
first kv_len slots, where kv_len is the longest sequence so far (rounded up to `kv_bucket` under CUDA
graphs so that a handful of graphs cover a whole generation).  Step functions (decode here, verify and
draft in speculative.py) run through `torch.compile` when `compile` is on (compiled.py), then through
`StepRunner` (graphs.py); prefill stays eager.

Host syncs: the chosen ids live on the device (`OutputBuffer`); the host reads a step's "all finished"
flag one step late (`Progress`), so the CPU keeps queueing work and a finished batch costs one extra
step; streaming reads the new ids in the same lagged copy.  Finished sequences keep
stepping (static batch) and their tokens are discarded.  Chat history is re-prefilled every call: no prefix
reuse across calls, no continuous batching (a server's scheduler would add both on top of this).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..model import Transformer
from .attention import ATTN_MODES
from .cache import LatentCache
from .compiled import CompiledHelper, CompiledStep, mark_cache_dynamic
from .forward import main_forward
from .gemv import decode_linear
from .graphs import StepRunner
from .outputs import OnTokens, OutputBuffer, Progress, append_block, step_flags
from .sampling import SamplingParams, race_noise, sample, sample_with


@dataclass
class GenerationOutput:
    tokens: list[list[int]]
    finish_reasons: list[str]  # "stop" (a stop token) or "length" (max_new_tokens)
    prompt_tokens: int
    prefill_s: float
    decode_s: float  # from the first token to the last
    steps: int  # decode forwards of the main model
    drafted_per_sequence: list[int] | None = None  # speculative: draft tokens proposed while live
    accepted_per_sequence: list[int] | None = None  # ... of which the main model accepted

    @property
    def drafted(self) -> int:
        return sum(self.drafted_per_sequence or [])

    @property
    def accepted(self) -> int:
        return sum(self.accepted_per_sequence or [])

    @property
    def new_tokens(self) -> int:
        return sum(map(len, self.tokens))

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second after each sequence's first one (which prefill produces); a sequence that
        stopped on its first token (no tokens: stop tokens are not kept) adds none."""
        n = sum(max(len(t) - 1, 0) for t in self.tokens)
        return n / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


class _Clock:
    """Marks on the device's timeline (CUDA events) or the host's; read once, at the end."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def advance(pending: torch.Tensor, lengths: torch.Tensor, *out_tensors: torch.Tensor) -> torch.Tensor:
    """A plain decode step's bookkeeping once its tokens pending [B] are chosen, in place: every cache
    length grows by one (the step wrote its slot), the outputs take the tokens (`append_block` on
    `OutputBuffer.tensors`).  -> Progress's flags."""
    lengths += 1
    append_block(*out_tensors, pending.unsqueeze(1), None)
    return step_flags(out_tensors[2])


def greedy_advance(logits: torch.Tensor, lengths: torch.Tensor, *out_tensors: torch.Tensor):
    """Greedy choice, then advance: -> (pending [B], flags)."""
    pending = logits.argmax(dim=-1)
    return pending, advance(pending, lengths, *out_tensors)


def sampled_advance(logits: torch.Tensor, noise: torch.Tensor, sampling: SamplingParams, lengths: torch.Tensor,
                    *out_tensors: torch.Tensor):
    """A sampled choice (noise from `race_noise` [B, V], drawn outside), then advance: -> (pending [B], flags)."""
    pending = sample_with(logits, sampling, noise)
    return pending, advance(pending, lengths, *out_tensors)


# Compiled whole when the steps compile: the ~30 tiny eager ops between two graph replays become a few
# kernels (a batch-1 step of the `bench` config fell from 821 to 766 us when the output bookkeeping
# alone was compiled: H200, bench/results/decode_2026-12-01_run6_bookkeeping.json).  Sampling takes
# its noise as an input, drawn eagerly in the order `sample` draws it, so seeded outputs do not change.
_greedy_advance_compiled, _sampled_advance_compiled = CompiledHelper(greedy_advance), CompiledHelper(sampled_advance)


class Generator:
    """cuda_graphs: capture decode steps in CUDA graphs (ignored off CUDA).  compile: run the step
    functions through torch.compile first (compiled.py).  None means "when CUDA graphs are on": the
    first generation pays for compiling (every new batch size 1 vs > 1, step kind and model too), which
    only pays off over many steps; on a CPU it is off unless asked for, and works when asked."""

    def __init__(self, model: Transformer, cuda_graphs: bool = False, attn_mode: str = "absorb", kv_bucket: int = 256,
                 compile: bool | None = None, vocab_limit: int | None = None):
        """vocab_limit: choose only ids below it (a tokenizer smaller than the model's embedding cannot decode
        the rest, which an undertrained model still picks now and then); None: every id."""
        if attn_mode not in ATTN_MODES:
            raise ValueError(f"unknown attention mode {attn_mode!r}; choose from {ATTN_MODES}")
        if vocab_limit is not None and not 1 <= vocab_limit <= model.cfg.vocab_size:
            raise ValueError(f"vocab_limit must lie in [1, {model.cfg.vocab_size}], got {vocab_limit}")
        self.vocab = vocab_limit or model.cfg.vocab_size  # ids the logits cover
        self.model = model  # only read: no mode switch, so a trainer can sample mid-run
        self.cfg = model.cfg
        self.device = model.head.weight.device
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"  # CPU falls back to eager
        self.compile = self.cuda_graphs if compile is None else compile
        self.attn_mode, self.kv_bucket = attn_mode, kv_bucket
        self.cache: LatentCache | None = None
        self._compiled: dict[str, CompiledStep] = {}  # compiled step functions by name, kept across caches

    # ------------------------------------------------------------------ cache and steps
    def reserve(self, batch: int, max_len: int) -> LatentCache:
        """An empty cache for `batch` sequences of up to `max_len` tokens.  Reuses the current one (and the
        graphs captured on it) when it fits.  A model with an MTP module always gets a layer of slots for
        it, so plain and speculative generation share one cache shape: switching between them neither
        recaptures graphs nor recompiles the steps (on the H200, torch 2.11, that recompile of a batch-1
        decode step with the MLA kernels failed and left every step eager: 2026-12-01, commit 44e734e)."""
        c = self.cache
        mtp_layers = min(self.cfg.num_mtp_layers, 1)  # speculative decoding drafts with MTP depth 1
        layers = self.cfg.num_layers + mtp_layers
        if c is None or c.batch != batch or c.max_len < max_len or c.kv.shape[0] < layers:
            max_len = -(-max_len // self.kv_bucket) * self.kv_bucket if self.cuda_graphs else max_len
            self.cache = LatentCache.for_model(self.model, batch, max_len, mtp_layers)
            if self.compile:
                mark_cache_dynamic(self.cache)
            self.runners: dict[str, StepRunner] = {}
            self.decode_runner = self.runner("decode", self.decode_step)
        self.cache.reset()
        return self.cache

    def runner(self, name: str, fn) -> StepRunner:
        """A StepRunner for step function `fn`, bound to the current cache: its graphs are dropped with it.
        With `compile`, `fn` is compiled once per generator and name (pass the same function each time)."""
        if name not in self.runners:
            if self.compile and name not in self._compiled:
                self._compiled[name] = CompiledStep(fn)
            self.runners[name] = StepRunner(self._compiled.get(name, fn), self.cuda_graphs)
        return self.runners[name]

    @property
    def compiled(self) -> bool:
        """Whether decode steps run compiled: `compile` is on and has not fallen back to eager."""
        step = self._compiled.get("decode")
        return step is not None and step.compiled is not None

    @property
    def compiled_steps(self) -> dict[str, bool]:
        """Each step kind compiled so far (decode, verify, draft) -> whether it still runs compiled."""
        return {name: step.compiled is not None for name, step in self._compiled.items()}

    def kv_len(self, needed: int) -> int:
        """Slots a step reads: exactly `needed` eagerly; a bucket boundary under CUDA graphs.  Never all
        max_len slots (`generate` reserves two more than a step can need): the whole cache would be a
        contiguous view, a case torch.compile compiles separately."""
        if self.cuda_graphs:
            needed = -(-needed // self.kv_bucket) * self.kv_bucket
        return min(needed, self.cache.max_len - 1)

    def decode_step(self, kv_len: int, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions [B, 1] -> next-token logits [B, V] (fp32); writes the tokens' latents.
        Static shapes, no host syncs, no state besides the cache slots: safe to capture in a CUDA graph."""
        h, _ = main_forward(self.model, self.cache, tokens, positions, kv_len, self.attn_mode)
        return self.logits(h[:, -1])

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [..., D] -> fp32 logits [..., vocab] over the ids generation may choose."""
        return decode_linear(self.model.head, h, float_out=True)[..., :self.vocab]

    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fills the cache with right-padded prompts.  Returns (tokens [B, P], the hidden states MTP reads
        [B, P, D], logits at each prompt's last token [B, V] fp32) and sets cache.lengths."""
        lens = torch.tensor([len(p) for p in prompts], device=self.device)
        width = int(max(len(p) for p in prompts))
        tokens = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = torch.as_tensor(p, dtype=torch.long)
        tokens = tokens.to(self.device)
        positions = torch.arange(width, device=self.device).expand(len(prompts), -1)
        h, h_raw = main_forward(self.model, self.cache, tokens, positions, width, fresh=True)
        last = h[torch.arange(len(prompts), device=self.device), lens - 1]  # [B, D]
        self.cache.lengths.copy_(lens)
        return tokens, (h if self.cfg.mtp_hidden_after_norm else h_raw), self.logits(last)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int] = 128,
                 sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
                 speculative: bool = False, num_draft: int = 1, on_tokens: OnTokens | None = None) -> GenerationOutput:
        """prompts: token ids per sequence (non-empty).  max_new_tokens and stop_ids: one for all or one
        per sequence; stop_ids None means the config's EOS.  speculative: MTP drafts `num_draft` tokens
        per step (see speculative.py).  on_tokens streams new tokens as they are read."""
        b = len(prompts)
        max_new = self._per_sequence(max_new_tokens, b, "max_new_tokens")
        stops = self._stop_lists(stop_ids, b)
        self._check(prompts, max_new, speculative, num_draft)
        block = num_draft + 1 if speculative else 1  # tokens a step can add
        width = max(len(p) for p in prompts)
        # speculative steps write up to 2 * num_draft slots past a sequence's length (verify + chained drafts)
        self.reserve(b, width + max(max_new) + (2 * num_draft + 1 if speculative else 1))
        out = OutputBuffer(max_new, stops, block, self.device)
        rng = sampling.generator(self.device)
        clock = _Clock(self.device)

        clock.mark()
        tokens, h_mtp, logits = self.prefill(prompts)
        first = sample(logits, sampling, rng)  # [B]
        out.add(first.unsqueeze(1))
        clock.mark()
        progress = Progress(out, on_tokens)
        if speculative:
            from .speculative import speculative_decode

            steps, drafted, accepted = speculative_decode(self, tokens, h_mtp, first, out, sampling, rng, num_draft,
                                                          max(max_new), progress)
        else:
            steps, drafted, accepted = self._decode(first, width, max(max_new), out, sampling, rng, progress), None, None
        clock.mark()
        final, _ = out.snapshot()
        progress.flush(final)
        prefill_s, decode_s = clock.seconds()
        return GenerationOutput(final, out.finish_reasons(), sum(map(len, prompts)), prefill_s, decode_s, steps, drafted, accepted)

    def _decode(self, pending: torch.Tensor, width: int, max_new: int, out: OutputBuffer, sampling: SamplingParams,
                rng: torch.Generator, progress: Progress) -> int:
        """Plain decoding: feed the last chosen token, choose the next.  Returns the number of steps."""
        cache, steps = self.cache, 0
        greedy = (_greedy_advance_compiled if self.compile else greedy_advance) if sampling.greedy else None
        sampled = _sampled_advance_compiled if self.compile else sampled_advance
        done = progress.start()
        while not done and steps < max_new - 1:
            kv_len = self.kv_len(width + steps + 1)  # every length grew by one per step
            logits = self.decode_runner(kv_len, pending.unsqueeze(1), cache.lengths.unsqueeze(1))
            if greedy is not None:
                pending, flags = greedy(logits, cache.lengths, *out.tensors)
            else:
                noise = race_noise(logits.shape, rng, logits.device)
                pending, flags = sampled(logits, noise, sampling, cache.lengths, *out.tensors)
            steps += 1
            seen = progress.after_step(flags)
            done = seen is not None and seen[0]
        return steps

    # ------------------------------------------------------------------ arguments
    @staticmethod
    def _per_sequence(value, b: int, name: str) -> list[int]:
        values = [value] * b if isinstance(value, int) else list(value)
        if len(values) != b:
            raise ValueError(f"{name}: {len(values)} values for {b} prompts")
        return values

    def _stop_lists(self, stop_ids, b: int) -> list[list[int]]:
        if stop_ids is None:
            return [[self.cfg.eos_token_id]] * b
        stop_ids = list(stop_ids)
        if all(isinstance(s, int) for s in stop_ids):
            return [stop_ids] * b
        if len(stop_ids) != b:
            raise ValueError(f"stop_ids: {len(stop_ids)} lists for {b} prompts")
        return [list(s) for s in stop_ids]

    def _check(self, prompts, max_new: list[int], speculative: bool, num_draft: int) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if any(m < 1 for m in max_new):
            raise ValueError("max_new_tokens must be >= 1")
        if any(not 0 <= t < self.cfg.vocab_size for p in prompts for t in p):
            raise ValueError(f"prompt token ids must lie in [0, {self.cfg.vocab_size})")
        context = self.cfg.max_position_embeddings
        longest = max(len(p) + m for p, m in zip(prompts, max_new))
        if longest > context:
            raise ValueError(f"a prompt plus its new tokens reach {longest} positions, past the model's context of "
                             f"{context} (max_position_embeddings): shorten the prompt or lower max_new_tokens")
        if speculative and (not len(self.model.mtp) or num_draft < 1):
            raise ValueError("speculative decoding needs a model with an MTP module and num_draft >= 1")
