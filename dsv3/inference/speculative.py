"""MTP speculative decoding (spec §1.9, "used as a speculative-decoding draft"): the model's MTP module
drafts, the main model verifies all drafts in one forward, the cache rolls back what it rejects.

Indexing (n tokens committed; the last one, `pending`, is not yet in the cache, so lengths = n - 1):
    MTP entry at position i pairs h_i (main model, after `model.norm` per cfg.mtp_hidden_after_norm)
    with the token at i+1 and predicts the token at i+2; so the MTP layer's cache has the same
    valid length as the main layers', and one `cache.lengths` serves both.
    draft d_1 = argmax MTP(h_{n-2}, pending); further drafts chain the MTP module on its own output
    (h^1 stands in for the unknown main-model state), at positions n-1, n, ...
Step:
    verify:  main forward of [pending, d_1..d_k] at positions n-1..n-1+k          -> logits [B, k+1, V]
    accept:  a = number of leading drafts the main model agrees with; the committed block is
             d_1..d_a plus the main model's own token after them (correction or bonus)
    MTP:     forward at the same k+1 positions with the committed tokens: refreshes the MTP cache
             entries and drafts from the entry at position n-1+a; entries past it are rolled back
    lengths += a + 1: the slots of rejected drafts stay behind the length and are overwritten later.

Greedy acceptance compares argmaxes, so greedy speculative output is token-identical to plain greedy.
With sampling, a draft d is accepted with probability p(d) and a rejection resamples from p without d:
speculative sampling for a deterministic draft, so the output distribution is the target's exactly.

Every sequence advances by its own a (ragged lengths are what the cache is built for).  The verify and
MTP forwards have static shapes and run through `Generator.runner`, so they are compiled and CUDA-graph
captured like the decode step.
The host reads the device only as plain decoding does (`Progress`: a step's flags one step late, or
everything each step when streaming); it bounds the longest sequence by k+1 tokens per step since the
last value it saw, to size kv_len.
Not here: drafting with deeper MTP modules (V3 ships one; deeper ones would need their own lagging
caches), tree drafts, and a separate draft model.
"""

from __future__ import annotations

import torch

from .forward import main_forward, mtp_forward, mtp_logits
from .compiled import CompiledHelper
from .outputs import OutputBuffer, Progress, append_block, step_flags
from .sampling import SamplingParams, draw, probabilities


def accept(logits: torch.Tensor, drafts: torch.Tensor, sampling: SamplingParams,
           rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, k+1, V] at the verified positions, drafts [B, k] ->
    (accepted drafts a [B], committed block [B, k+1] whose first a+1 tokens are the new ones)."""
    if sampling.greedy:
        return accept_greedy(logits, drafts)
    k = drafts.shape[1]
    p = probabilities(logits, sampling)  # [B, k+1, V]
    p_draft = p[:, :k].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # [B, k]
    u = torch.rand(p_draft.shape, generator=rng, device=p.device)
    a = (u < p_draft).long().cumprod(dim=-1).sum(dim=-1)
    residual = p.clone()
    residual[:, :k].scatter_(-1, drafts.unsqueeze(-1), 0.0)  # rejected draft: sample p without it
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
    own = draw(residual, rng)  # [B, k+1]: the main model's token if the block ends at j
    j = torch.arange(k + 1, device=p.device)
    return a, torch.where(j < a.unsqueeze(1), torch.cat([drafts, own[:, k:]], dim=1), own)


def accept_greedy(logits: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """accept for greedy decoding: the drafts that equal the main model's argmax, up to the first miss."""
    k = drafts.shape[1]
    target = logits.argmax(dim=-1)  # [B, k+1]
    a = (target[:, :k] == drafts).long().cumprod(dim=-1).sum(dim=-1)
    return a, target  # target equals the drafts wherever they were accepted


def commit(a: torch.Tensor, block: torch.Tensor, lengths: torch.Tensor, drafted: torch.Tensor, accepted: torch.Tensor,
           *out_tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A step's bookkeeping once its block is chosen, in place: each live sequence's output takes the
    block's first a+1 tokens (`append_block` on `OutputBuffer.tensors`), its cache keeps a+1 of the k+1
    verified slots (`lengths` [B] is the cache's: the rejected drafts' slots fall behind it and are
    overwritten later; sequences finished by this block or before stay put) and its counters grow.
    -> (the next pending token [B], the position of the MTP entry that drafts next [B], Progress's flags
    watching the longest length)."""
    k = block.shape[1] - 1
    live = ~out_tensors[2]  # finished, before this block
    append_block(*out_tensors, block, a + 1)
    start = lengths + a
    # only sequences still live after the block advance: one this block finishes keeps fewer than a+1
    # tokens, and had it advanced, the steps its batch-mates still take would write past the cache
    lengths.copy_(lengths + (a + 1) * ~out_tensors[2])
    drafted += k * live
    accepted += a * live
    return block.gather(1, a.unsqueeze(1)).squeeze(1), start, step_flags(out_tensors[2], lengths.max())


def greedy_step(logits: torch.Tensor, drafts: torch.Tensor, *state: torch.Tensor):
    """accept_greedy then commit: everything between a greedy step's verify and its draft forward."""
    a, block = accept_greedy(logits, drafts)
    return (a, block, *commit(a, block, *state))


# Compiled whole when the steps compile: ~30 tiny eager ops between the graph replays of each step
# become a few kernels (as engine.advance does for plain decoding).
_commit_compiled, _greedy_step_compiled = CompiledHelper(commit), CompiledHelper(greedy_step)


class _Steps:
    """The two static-shape forwards of a step, as functions of (kv_len, *tensors) for StepRunner."""

    def __init__(self, gen):
        self.gen, self.model = gen, gen.model

    def verify(self, kv_len: int, tokens: torch.Tensor, positions: torch.Tensor):
        """tokens, positions [B, T] -> (logits [B, T, V] fp32, hidden states for MTP [B, T, D])."""
        h, h_raw = main_forward(self.model, self.gen.cache, tokens, positions, kv_len, self.gen.attn_mode)
        return self.gen.logits(h), (h if self.model.cfg.mtp_hidden_after_norm else h_raw)

    def draft(self, kv_len: int, h_prev: torch.Tensor, ahead: torch.Tensor, positions: torch.Tensor,
              select: torch.Tensor):
        """MTP over [B, T] positions; drafts from entry `select` [B] -> (draft [B], MTP state there [B, D])."""
        h_sel = mtp_forward(self.model, self.gen.cache, h_prev, ahead, positions, kv_len, self.gen.attn_mode,
                            select=select)[:, 0]  # the MoE runs at the selected position only
        return mtp_logits(self.model, h_sel)[..., :self.gen.vocab].argmax(dim=-1), h_sel


@torch.no_grad()
def speculative_decode(gen, prompt_tokens: torch.Tensor, h_prompt: torch.Tensor, pending: torch.Tensor,
                       out: OutputBuffer, sampling: SamplingParams, rng: torch.Generator, k: int, max_new: int,
                       progress: Progress) -> tuple[int, list[int], list[int]]:
    """Runs after `gen.prefill` and the first sampled token (`pending` [B]) until every sequence is done.
    Returns (steps, drafted, accepted): the last two per sequence, counting its live steps only."""
    cache, steps_fn = gen.cache, _Steps(gen)
    verify, draft = gen.runner("verify", steps_fn.verify), gen.runner("draft", steps_fn.draft)
    b, width = prompt_tokens.shape
    rows, window = torch.arange(b, device=gen.device), torch.arange(k + 1, device=gen.device)

    # MTP prefill: entry i pairs h_i with token i+1; the last entry's token is the one just sampled.
    lens = cache.lengths.clone()
    ahead = prompt_tokens.roll(-1, dims=1).scatter(1, (lens - 1).unsqueeze(1), pending.unsqueeze(1))
    positions = torch.arange(width, device=gen.device).expand(b, -1)
    h1 = mtp_forward(gen.model, cache, h_prompt, ahead, positions, width, fresh=True)
    first = mtp_logits(gen.model, h1[rows, lens - 1])[..., :gen.vocab].argmax(dim=-1)
    drafts = _chain(gen, draft, first, h1[rows, lens - 1], lens - 1, k, width + k)

    steps, drafted, accepted = 0, torch.zeros_like(lens), torch.zeros_like(lens)  # [B] each
    state = (cache.lengths, drafted, accepted, *out.tensors)
    step_fn = (_greedy_step_compiled if gen.compile else greedy_step) if sampling.greedy else None
    commit_fn = _commit_compiled if gen.compile else commit
    longest, done = width, progress.start()  # longest: a host bound on cache.lengths.max()
    while not done and steps < max_new - 1:  # every live sequence gains >= 1 token per step
        positions = cache.lengths.unsqueeze(1) + window  # [B, k+1]
        kv_len = gen.kv_len(longest + k + 1)
        logits, h = verify(kv_len, torch.cat([pending.unsqueeze(1), drafts], dim=1), positions)
        if step_fn is not None:
            a, block, pending, start, flags = step_fn(logits, drafts, *state)
        else:
            a, block = accept(logits, drafts, sampling, rng)
            pending, start, flags = commit_fn(a, block, *state)
        # the forwards never read cache.lengths, so the draft may run after the commit
        first, h_sel = draft(kv_len, h, block, positions, a)
        drafts = _chain(gen, draft, first, h_sel, start, k, longest + 2 * k)
        steps += 1
        longest += k + 1
        seen = progress.after_step(flags)
        if seen is not None:  # as of this step or the one before: the bound tightens to that + one step
            done, longest = seen[0], min(longest, seen[1][0] + k + 1)
    return steps, drafted.tolist(), accepted.tolist()


def _chain(gen, draft, first: torch.Tensor, h_sel: torch.Tensor, start: torch.Tensor, k: int, needed: int) -> torch.Tensor:
    """Drafts 2..k: the MTP module fed its own output [B, D] and last draft, at positions start+1,
    start+2, ... ([B] each); `needed` bounds the slots read.  -> drafts [B, k]."""
    drafts, zero, kv_len = [first.clone()], torch.zeros_like(first), gen.kv_len(needed)
    for j in range(1, k):
        d, h_sel = draft(kv_len, h_sel.unsqueeze(1), drafts[-1].unsqueeze(1), (start + j).unsqueeze(1), zero)
        drafts.append(d.clone())  # the runner's output buffer is rewritten by the next replay
    return torch.stack(drafts, dim=1)
