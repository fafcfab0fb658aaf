"""Choosing tokens from logits on the device: greedy, temperature, top-k, top-p, seeded.

Sampling draws through an explicit `torch.Generator` (no global RNG state, design principle 12) and
uses the exponential race — argmax(p / E) with E ~ Exp(1) is a draw from p — as DeepSeek's demo does:
no host round trip and no `torch.multinomial`.  `probabilities` is separate because speculative
sampling needs the processed distribution itself.

Not here: repetition/frequency penalties, logit bias, min-p, beam search; one SamplingParams per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p; 1 = all
    seed: int | None = None  # None: a nondeterministic seed

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:  # NaN fails this too
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not -(2 ** 63) <= self.seed < 2 ** 64:  # torch.Generator's range
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device | str) -> torch.Generator:
        g = torch.Generator(device=device)
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [..., V] -> fp32 probabilities [..., V] after temperature, top-k and top-p; excluded
    tokens get exactly 0.  Needs temperature > 0.  The maximum is subtracted before the division, so a
    tiny temperature sends the others to -inf (greedy in the limit) instead of overflowing to NaN."""
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kept = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(params.top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~kept, float("-inf"))
    probs = logits.softmax(dim=-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the more likely tokens
        drop_sorted = before >= params.top_p  # the first token is always kept
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)  # back to vocab order
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def race_noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Exp(1) draws [shape] (fp32) for `draw_with`.  Drawn apart from the maths so that the maths can run
    inside a compiled function: Dynamo cannot trace an explicit generator."""
    return torch.empty(shape, device=device).exponential_(generator=generator)


def draw_with(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The exponential race: one draw per row of (possibly unnormalised) probs [..., V] given noise of
    the same shape from `race_noise` -> ids [...]."""
    return (probs / noise.clamp_min(1e-20)).argmax(dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row of (possibly unnormalised) probs [..., V] -> ids [...]."""
    return draw_with(probs, race_noise(probs.shape, generator, probs.device))


def sample_with(logits: torch.Tensor, params: SamplingParams, noise: torch.Tensor) -> torch.Tensor:
    """`sample` for temperature > 0 given its noise (`race_noise` of the logits' shape): compilable."""
    return draw_with(probabilities(logits, params), noise)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """logits [..., V] -> token ids [...] (int64)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    return draw(probabilities(logits, params), generator)
