"""Top-k and stable argsort by counting, for the few-candidate selections of routing under torch.compile.

`torch.topk` is a radix select plus a sort of the winners, and `argsort` a sort: each is two or three
launches that Inductor cannot fuse with anything.  In a batch-1 decode step of the `bench` config the
router's three top-k calls and the dispatcher's argsort were 28 launches and ~180 µs of a 1.43 ms step
(H200 profile, bench/results/decode_2026-12-01*.json).  Counting does the same selection with
comparisons only:

    rank_i = #{j : x_j beats x_i}          (an [.., n, n] comparison, summed over j)
    out_r  = sum_i i * [rank_i == r]       (an [.., m, n] one-hot, summed over i)

which Inductor fuses into a couple of reductions beside the router's other arithmetic.  The work is
quadratic in n, so it is taken only under compile and while rows * n^2 stays small (decode and short
prompts); eager code and large batches keep torch's kernels.  Ties go to the lower index, as in a
stable sort; `torch.topk` leaves their order unspecified, so the two agree wherever values are distinct.
"""

from __future__ import annotations

import torch

# rows * n * n comparisons at most: 2^22 is ~4 M (4096 rows of 32 experts, 64 rows of 256), a few µs.
# Training batches (16 k rows) keep torch's kernels: counting there is unmeasured.
MAX_COMPARISONS = 1 << 22


def _counting(x: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() and x.numel() * x.shape[-1] <= MAX_COMPARISONS


def _beats(x: torch.Tensor, descending: bool) -> torch.Tensor:
    """[..., n] -> [..., n (i), n (j)] bool: x_j comes before x_i (ties: the lower index first)."""
    n = x.shape[-1]
    idx = torch.arange(n, device=x.device)
    xi, xj = x.unsqueeze(-1), x.unsqueeze(-2)
    ahead = xj > xi if descending else xj < xi
    return ahead | ((xj == xi) & (idx < idx.unsqueeze(-1)))


def _place(rank: torch.Tensor, m: int) -> torch.Tensor:
    """rank [..., n] (a permutation of 0..n-1 per row) -> the indices i holding ranks 0..m-1, [..., m]."""
    n = rank.shape[-1]
    slots = torch.arange(m, device=rank.device).unsqueeze(-1)  # [m, 1]
    return ((rank.unsqueeze(-2) == slots) * torch.arange(n, device=rank.device)).sum(-1)


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last dim, largest first: x [..., n] -> [..., k] int64."""
    if not _counting(x):
        return x.topk(k, dim=-1).indices
    return _place(_beats(x, descending=True).sum(-1), k)


def stable_argsort(x: torch.Tensor) -> torch.Tensor:
    """`x.argsort(dim=-1, stable=True)` (ascending): x [..., n] -> [..., n] int64."""
    if not _counting(x):
        return x.argsort(dim=-1, stable=True)
    return _place(_beats(x, descending=False).sum(-1), x.shape[-1])
