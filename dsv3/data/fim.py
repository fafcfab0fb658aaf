"""Fill-in-the-middle (FIM) in the Prefix-Suffix-Middle layout, one document at a time.

DeepSeek-V3 rewrites 10% of documents before packing as
    <｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜> middle      (EOS follows, from packing)
so the plain next-token objective also teaches infilling.

We cut on token ids, after tokenisation, not on characters before it: the cut points are then
uniform over tokens, the corpus is tokenised once (in parallel batches) whatever the FIM draw, and
`undo_fim` is exact. The cost is that a cut never falls inside a token, so the model does not learn
to complete a half-written token at the hole; character-level FIM (DeepSeek-Coder's) would.  A
byte-level token can begin inside a multi-byte character (CJK, emoji): cuts before such tokens
(`mid_character`, `Tokenizer.mid_character_ids`) are left out, so no piece holds half a character.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import NamedTuple


class FimIds(NamedTuple):
    """The three sentinel ids; a `Tokenizer` has the same attribute names and works too."""

    fim_begin_id: int
    fim_hole_id: int
    fim_end_id: int


def apply_fim(tokens: Sequence[int], rng: random.Random, rate: float, ids: FimIds,
              mid_character: Collection[int] = frozenset()) -> Sequence[int]:
    """With probability `rate`, a new PSM-ordered list; otherwise `tokens` itself, unchanged.  No cut
    falls before a token of `mid_character` (ids that begin inside a UTF-8 character)."""
    if rng.random() >= rate:
        return tokens
    # Two cut points uniform over the allowed ones in [0, len]; any of prefix, middle, suffix may be empty.
    cuts = [k for k in range(len(tokens) + 1) if k == len(tokens) or tokens[k] not in mid_character]
    i, j = sorted((cuts[rng.randint(0, len(cuts) - 1)], cuts[rng.randint(0, len(cuts) - 1)]))
    prefix, middle, suffix = tokens[:i], tokens[i:j], tokens[j:]
    return [ids.fim_begin_id, *prefix, ids.fim_hole_id, *suffix, ids.fim_end_id, *middle]


def undo_fim(tokens: Sequence[int], ids: FimIds) -> list[int]:
    """Puts a PSM document back in order; other documents come back as they are. Assumes the
    document had no FIM sentinels of its own."""
    tokens = list(tokens)
    if not tokens or tokens[0] != ids.fim_begin_id:
        return tokens
    try:
        hole = tokens.index(ids.fim_hole_id, 1)
        end = tokens.index(ids.fim_end_id, hole + 1)
    except ValueError:
        raise ValueError("document starts with fim_begin but lacks fim_hole or fim_end") from None
    prefix, suffix, middle = tokens[1:hole], tokens[hole + 1:end], tokens[end + 1:]
    return prefix + middle + suffix
