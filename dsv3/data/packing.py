"""Document packing: documents back to back, an EOS after each, cut into fixed-length windows.

The stream d0 EOS d1 EOS d2 EOS ... is cut into windows of `seq_len + 1` tokens that start every
`seq_len` tokens, so consecutive windows share one token: a window's last token is the target of
its last input and the input of the next window's first target. Every token after the first is a
target exactly once. Only the incomplete tail is dropped.

As in DeepSeek-V3 pre-training there is no cross-document attention mask: a window may span several
documents and attention crosses the EOS between them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from dsv3.data.tokenizer import EOS_ID


def num_windows(num_tokens: int, seq_len: int) -> int:
    """How many whole windows of `seq_len + 1` tokens, at stride `seq_len`, a stream holds."""
    return max(num_tokens - 1, 0) // seq_len


def join_documents(docs: Iterable[np.ndarray], eos_id: int, dtype: np.dtype) -> np.ndarray:
    """The whole stream d0 EOS d1 EOS ... as one flat array."""
    eos = np.array([eos_id], dtype=dtype)
    parts = [part for doc in docs for part in (np.asarray(doc, dtype=dtype), eos)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def pack_documents(doc_token_iter: Iterable[Sequence[int]], seq_len: int,
                   eos_id: int = EOS_ID) -> Iterator[np.ndarray]:
    """Streams int64 rows of `seq_len + 1` tokens: inputs are row[:-1], targets row[1:]."""
    buffer = np.empty(0, dtype=np.int64)
    for doc in doc_token_iter:
        buffer = np.concatenate([buffer, np.asarray(doc, dtype=np.int64), [eos_id]])
        n = num_windows(len(buffer), seq_len)
        for k in range(n):
            yield buffer[k * seq_len: (k + 1) * seq_len + 1].copy()  # [seq_len + 1]
        buffer = buffer[n * seq_len:]  # keeps the shared token at the start of the next window
