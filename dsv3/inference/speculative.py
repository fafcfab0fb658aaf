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
With sampling, the MTP module samples its drafts from its own distribution q (its logits under the same
temperature, top-k and top-p); the main model accepts a draft d with probability min(1, p(d) / q(d)) and a
rejection resamples from max(0, p - q): speculative sampling (Leviathan et al. 2023; Chen et al. 2023),
so the output distribution is the target's exactly.  Chained drafts are accepted left to right, each q
conditioned on the drafts before it.  (Until 2026-12-02 the sampled draft was q's argmax, accepted with
probability p(d): exact too, but it accepts E[p(argmax q)] against E[sum min(p, q)]; on the `bench` MTP
checkpoint at temperature 0.7 that was 21-40 % of drafts.)

Every sequence advances by its own a (ragged lengths are what the cache is built for).  The verify and
MTP forwards have static shapes and run through `Generator.runner`, so they are compiled and CUDA-graph
captured like the decode step.
The host reads the device only as plain decoding does (`Progress`: a step's flags, and the new ids
when streaming, one step late), except that it waits for the step that may end the batch by
length (the flags carry the largest remaining budget), so no verify + draft runs after the end; it
bounds the longest sequence by k+1 tokens per step since the last value it saw, to size kv_len.
Not here: drafting with deeper MTP modules (V3 ships one; deeper ones would need their own lagging
caches), tree drafts, and a separate draft model.
"""

from __future__ import annotations

import torch

from .forward import main_forward, mtp_forward, mtp_logits
from .compiled import CompiledHelper
from .outputs import OutputBuffer, Progress, append_block, step_flags
from .sampling import SamplingParams, draw_with, probabilities, race_noise

# Sampled decoding drafts from the MTP head's own distribution q (True), or takes its argmax as a one-hot q
# (False: the form before 2026-12-02, kept to A/B the two on one checkpoint, bench/decode.py --mtp-drafts).
# Both are exact; they differ in acceptance.  Read at each generate.
SAMPLED_DRAFTS = True


def accept(logits: torch.Tensor, drafts: torch.Tensor, sampling: SamplingParams, rng: torch.Generator,
           q: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, k+1, V] at the verified positions, drafts [B, k] (sampled: drawn from q [B, k, V]) ->
    (accepted drafts a [B], committed block [B, k+1] whose first a+1 tokens are the new ones)."""
    if sampling.greedy:
        return accept_greedy(logits, drafts)
    return accept_sampled(logits, drafts, q, sampling, *acceptance_noise(logits, drafts, rng))


def acceptance_noise(logits: torch.Tensor, drafts: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The random numbers of a sampled acceptance, drawn eagerly (Dynamo cannot trace an explicit
    generator) in a fixed order: uniforms u [B, k] for the drafts, then race noise [B, k+1, V]."""
    u = torch.rand(drafts.shape, generator=rng, device=logits.device)
    return u, race_noise(logits.shape, rng, logits.device)


def accept_sampled(logits: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor, sampling: SamplingParams,
                   u: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`accept` for temperature > 0 given its random numbers (`acceptance_noise`) and the drafts'
    distributions q [B, k, V] (`draft_choice`; a one-hot q is a deterministic draft): compilable."""
    k = drafts.shape[1]
    p = probabilities(logits, sampling)  # [B, k+1, V]
    p_draft = p[:, :k].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # [B, k]
    q_draft = q.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # > 0: d was drawn from q
    a = (u * q_draft < p_draft).long().cumprod(dim=-1).sum(dim=-1)  # each accepted w.p. min(1, p(d) / q(d))
    # a rejection at j resamples from max(0, p_j - q_j); the bonus row (all k accepted) from p itself
    residual = (p - torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)).clamp_min(0.0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)  # p == q: never rejected anyway
    own = draw_with(residual, noise)  # [B, k+1]: the main model's token if the block ends at j
    j = torch.arange(k + 1, device=p.device)
    return a, torch.where(j < a.unsqueeze(1), torch.cat([drafts, own[:, k:]], dim=1), own)


def draft_choice(logits: torch.Tensor, noise: torch.Tensor, sampling: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """A sampled draft: MTP logits [B, V] fp32 and race noise [B, V] -> (draft [B], its distribution q [B, V])."""
    q = probabilities(logits, sampling)
    return draw_with(q, noise), q


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
    tokens, count, finished, stopped, stop, limit = out_tensors
    budget = ((limit - count) * ~finished).max()  # the most tokens a live sequence may still take
    return block.gather(1, a.unsqueeze(1)).squeeze(1), start, step_flags(finished, lengths.max(), budget)


def greedy_step(logits: torch.Tensor, drafts: torch.Tensor, *state: torch.Tensor):
    """accept_greedy then commit: everything between a greedy step's verify and its draft forward."""
    a, block = accept_greedy(logits, drafts)
    return (a, block, *commit(a, block, *state))


def sampled_step(logits: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor, u: torch.Tensor, noise: torch.Tensor,
                 sampling: SamplingParams, *state: torch.Tensor):
    """accept_sampled then commit, given the drafts' distributions and the step's `acceptance_noise`."""
    a, block = accept_sampled(logits, drafts, q, sampling, u, noise)
    return (a, block, *commit(a, block, *state))


# Compiled whole when the steps compile: ~30 tiny eager ops between the graph replays of each step
# become a few kernels (as engine.advance does for plain decoding); a sampled step's ~25 more with them.
_greedy_step_compiled, _sampled_step_compiled = CompiledHelper(greedy_step), CompiledHelper(sampled_step)
_draft_choice_compiled = CompiledHelper(draft_choice)


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
        """MTP over [B, T] positions; drafts greedily from entry `select` [B] -> (draft [B], MTP state there [B, D])."""
        logits, h_sel = self.draft_logits(kv_len, h_prev, ahead, positions, select)
        return logits.argmax(dim=-1), h_sel

    def draft_logits(self, kv_len: int, h_prev: torch.Tensor, ahead: torch.Tensor, positions: torch.Tensor,
                     select: torch.Tensor):
        """`draft` before the choice (sampling draws outside, `draft_choice`) -> (MTP logits [B, V] fp32, MTP state [B, D])."""
        h_sel = mtp_forward(self.model, self.gen.cache, h_prev, ahead, positions, kv_len, self.gen.attn_mode,
                            select=select)[:, 0]  # the MoE runs at the selected position only
        return mtp_logits(self.model, h_sel)[..., :self.gen.vocab], h_sel


@torch.no_grad()
def speculative_decode(gen, prompt_tokens: torch.Tensor, h_prompt: torch.Tensor, pending: torch.Tensor,
                       out: OutputBuffer, sampling: SamplingParams, rng: torch.Generator, k: int, max_new: int,
                       progress: Progress) -> tuple[int, list[int], list[int]]:
    """Runs after `gen.prefill` and the first sampled token (`pending` [B]) until every sequence is done.
    Returns (steps, drafted, accepted): the last two per sequence, counting its live steps only."""
    cache, steps_fn = gen.cache, _Steps(gen)
    verify = gen.runner("verify", steps_fn.verify)
    b, width = prompt_tokens.shape
    rows, window = torch.arange(b, device=gen.device), torch.arange(k + 1, device=gen.device)
    sample_drafts = not sampling.greedy and SAMPLED_DRAFTS
    choose = _draft_choice_compiled if gen.compile else draft_choice

    def argmax_q(d: torch.Tensor) -> torch.Tensor | None:  # sampled decoding with argmax drafts: a one-hot q
        return None if sampling.greedy else torch.nn.functional.one_hot(d, gen.vocab).float()

    def pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:  # MTP logits [B, V] -> (draft, q)
        if sample_drafts:
            return choose(logits, race_noise(logits.shape, rng, logits.device), sampling)
        d = logits.argmax(dim=-1)
        return d, argmax_q(d)

    if sample_drafts:  # the draft graph ends at the logits; `pick` draws
        draft_logits = gen.runner("draft_logits", steps_fn.draft_logits)

        def drafter(kv_len: int, *args: torch.Tensor):
            logits, h_sel = draft_logits(kv_len, *args)
            return *pick(logits), h_sel
    else:  # the argmax inside the draft graph
        greedy_draft = gen.runner("draft", steps_fn.draft)

        def drafter(kv_len: int, *args: torch.Tensor):
            d, h_sel = greedy_draft(kv_len, *args)
            return d, argmax_q(d), h_sel

    # MTP prefill: entry i pairs h_i with token i+1; the last entry's token is the one just sampled.
    lens = cache.lengths.clone()
    ahead = prompt_tokens.roll(-1, dims=1).scatter(1, (lens - 1).unsqueeze(1), pending.unsqueeze(1))
    positions = torch.arange(width, device=gen.device).expand(b, -1)
    h1 = mtp_forward(gen.model, cache, h_prompt, ahead, positions, width, fresh=True)
    first, q_first = pick(mtp_logits(gen.model, h1[rows, lens - 1])[..., :gen.vocab])
    drafts, q = _chain(gen, drafter, first, q_first, h1[rows, lens - 1], lens - 1, k, width + k)

    steps, drafted, accepted = 0, torch.zeros_like(lens), torch.zeros_like(lens)  # [B] each
    state = (cache.lengths, drafted, accepted, *out.tensors)
    if sampling.greedy:
        greedy = _greedy_step_compiled if gen.compile else greedy_step
        step_fn = lambda logits, drafts, q, *state: greedy(logits, drafts, *state)  # noqa: E731
    else:
        sampled = _sampled_step_compiled if gen.compile else sampled_step
        step_fn = lambda logits, drafts, q, *state: sampled(logits, drafts, q,  # noqa: E731
                                                           *acceptance_noise(logits, drafts, rng), sampling, *state)
    longest, done, near_end = width, progress.start(), False  # longest: a host bound on cache.lengths.max()
    while not done and steps < max_new - 1:  # every live sequence gains >= 1 token per step
        positions = cache.lengths.unsqueeze(1) + window  # [B, k+1]
        kv_len = gen.kv_len(longest + k + 1)
        logits, h = verify(kv_len, torch.cat([pending.unsqueeze(1), drafts], dim=1), positions)
        a, block, pending, start, flags = step_fn(logits, drafts, q, *state)
        # the forwards never read cache.lengths, so the draft may run after the commit
        first, q_first, h_sel = drafter(kv_len, h, block, positions, a)
        drafts, q = _chain(gen, drafter, first, q_first, h_sel, start, k, longest + 2 * k)
        steps += 1
        longest += k + 1
        seen, lag = progress.after_step(flags), k + 1  # as of this step or the one before
        if near_end or (seen is not None and seen[1][1] <= k + 1):
            # the step just queued may end every sequence by length: from now on look at each step
            # before queueing another (short waits at the end, against a whole wasted verify + draft)
            near_end, now = True, progress.wait()
            if now is not None:
                seen, lag = now, 0
        if seen is not None:  # the bound tightens to the length seen + the steps since
            done, longest = seen[0], min(longest, seen[1][0] + lag)
    return steps, drafted.tolist(), accepted.tolist()


def _chain(gen, drafter, first: torch.Tensor, q_first: torch.Tensor | None, h_sel: torch.Tensor, start: torch.Tensor,
           k: int, needed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drafts 2..k: the MTP module fed its own output [B, D] and last draft, at positions start+1,
    start+2, ... ([B] each); `needed` bounds the slots read.  -> (drafts [B, k], their distributions
    [B, k, V] when sampling, else None)."""
    drafts, qs, zero, kv_len = [first.clone()], [q_first], torch.zeros_like(first), gen.kv_len(needed)
    for j in range(1, k):
        d, q, h_sel = drafter(kv_len, h_sel.unsqueeze(1), drafts[-1].unsqueeze(1), (start + j).unsqueeze(1), zero)
        drafts.append(d.clone())  # the runner's output buffer is rewritten by the next replay
        qs.append(q)
    return torch.stack(drafts, dim=1), (None if q_first is None else torch.stack(qs, dim=1))
