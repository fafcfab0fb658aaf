"""Byte-level BPE tokenizer with DeepSeek-V3's special tokens and chat template.

A thin wrapper over Hugging Face `tokenizers` (the Rust library does the BPE training, encoding and
serialisation; nothing here re-implements it). What this file adds:

- the special tokens, always at ids 0..7 in the order of `SPECIAL_TOKENS`, so BOS is 0 and EOS is 1
  as in DeepSeek-V3 (their FIM/chat ids in the real tokenizer are unconfirmed; ours are fixed here);
- the GPT-2-style byte-level set-up (ByteLevel pre-tokenizer without a prefix space, ByteLevel
  decoder, all 256 bytes in the initial alphabet) so every string encodes and decodes exactly;
- DeepSeek's chat layout as a plain string function, and load errors as one-line `ValueError`s.

Not here: the report's randomly split punctuation+newline tokens (the proportion is unpublished).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as _RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

# Full-width bar ｜ (U+FF5C) and ▁ (U+2581), as in DeepSeek's tokenizer.json.
BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
FIM_BEGIN = "<｜fim▁begin｜>"
FIM_HOLE = "<｜fim▁hole｜>"
FIM_END = "<｜fim▁end｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
PAD_TOKEN = "<｜pad｜>"
V3_PAD_TOKEN = "<｜▁pad▁｜>"  # DeepSeek-V3's released tokenizer.json spells its pad token so
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, FIM_BEGIN, FIM_HOLE, FIM_END, USER_TOKEN, ASSISTANT_TOKEN, PAD_TOKEN]
REQUIRED_TOKENS = SPECIAL_TOKENS[:-1]  # pad is optional: nothing here pads with it
EOS_ID = SPECIAL_TOKENS.index(EOS_TOKEN)  # 1: the id every tokenizer trained here gives EOS


def _chat_segments(messages: list[dict], add_generation_prompt: bool) -> list[tuple[str, bool]]:
    """DeepSeek's chat layout as (text, is a special token) pieces, in order."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    out = [(BOS_TOKEN, True), (system, False)]
    for m in messages:
        if m["role"] == "user":
            out += [(USER_TOKEN, True), (m["content"], False)]
        elif m["role"] == "assistant":
            out += [(ASSISTANT_TOKEN, True), (m["content"], False), (EOS_TOKEN, True)]
        elif m["role"] != "system":
            raise ValueError(f"unknown chat role {m['role']!r} (expected system, user or assistant)")
    if add_generation_prompt:  # whatever the last turn, as DeepSeek-V3's template (tool turns aside)
        out.append((ASSISTANT_TOKEN, True))
    return out


class Tokenizer:
    """A `tokenizers.Tokenizer` that is known to hold all of `SPECIAL_TOKENS`."""

    def __init__(self, backend: _RustTokenizer):
        ids = {token: backend.token_to_id(token) for token in REQUIRED_TOKENS}
        missing = [token for token, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        pad = backend.token_to_id(PAD_TOKEN)
        ids[PAD_TOKEN] = pad if pad is not None else backend.token_to_id(V3_PAD_TOKEN)
        self._backend = backend
        self._ids = ids
        self._byte_lengths: np.ndarray | None = None

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._ids[BOS_TOKEN]

    @property
    def eos_id(self) -> int:
        return self._ids[EOS_TOKEN]

    @property
    def pad_id(self) -> int | None:
        return self._ids[PAD_TOKEN]

    @property
    def fim_begin_id(self) -> int:
        return self._ids[FIM_BEGIN]

    @property
    def fim_hole_id(self) -> int:
        return self._ids[FIM_HOLE]

    @property
    def fim_end_id(self) -> int:
        return self._ids[FIM_END]

    @property
    def user_id(self) -> int:
        return self._ids[USER_TOKEN]

    @property
    def assistant_id(self) -> int:
        return self._ids[ASSISTANT_TOKEN]

    @functools.cached_property
    def mid_character_ids(self) -> frozenset[int]:
        """Ids whose bytes start with a UTF-8 continuation byte (0x80-0xBF): a cut before one splits a
        character (FIM must not cut there)."""
        byte_of = _byte_level_alphabet()
        return frozenset(i for token, i in self._backend.get_vocab(with_added_tokens=False).items()
                         if token and 0x80 <= byte_of.get(token[0], 0) < 0xC0)

    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes of text each id stands for [vocab_size] (int64): a byte-level token's spelling has one
        character per byte; added (special) tokens stand for no text, 0.  For bits per byte of exactly
        the tokens a loss was measured on."""
        if self._byte_lengths is None:
            byte_of = _byte_level_alphabet()
            out = np.zeros(self.vocab_size, dtype=np.int64)
            for token, i in self._backend.get_vocab(with_added_tokens=False).items():
                # a character outside the byte alphabet (a tokenizer that is not byte-level): its text's bytes
                out[i] = sum(1 if ch in byte_of else len(ch.encode()) for ch in token)
            out[list(self._backend.get_added_tokens_decoder())] = 0
            self._byte_lengths = out
        return self._byte_lengths

    def encode(self, text: str) -> list[int]:
        # Special-token strings inside `text` become their single ids (that is how the chat
        # template is encoded); no BOS/EOS is added.
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # The Rust encoder spreads the batch over all cores.
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode_text_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ordinary text (a training corpus): a special token's spelling inside it stays text, so a document
        that quotes `<｜end▁of▁sentence｜>` is not split by a stray EOS, nor given stray FIM markers."""
        self._backend.encode_special_tokens = True
        try:
            return self.encode_batch(texts)
        finally:
            self._backend.encode_special_tokens = False

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """DeepSeek's layout: BOS, system text (no marker), then `<｜User｜>u` and
        `<｜Assistant｜>a<｜end▁of▁sentence｜>` turns; several system messages are joined by a blank
        line, as DeepSeek-V3's template does."""
        return "".join(text for text, _ in _chat_segments(messages, add_generation_prompt))

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The ids of `apply_chat_template`, with the template's markers as special ids and the messages'
        contents as plain text: a user who types `<｜end▁of▁sentence｜>` or `<｜Assistant｜>` gets those
        characters, not an injected EOS or turn.  Equal to encode(apply_chat_template(...)) otherwise
        (added tokens split the text before BPE, so the pieces tokenise alike either way)."""
        segments = _chat_segments(messages, add_generation_prompt)
        texts = iter(self.encode_text_batch([text for text, special in segments if not special]))
        ids: list[int] = []
        for text, special in segments:
            ids += [self._backend.token_to_id(text)] if special else next(texts)
        return ids

    def to_json(self) -> str:
        return self._backend.to_str()

    def save(self, path: str | Path) -> Path:
        """Writes `tokenizer.json` (atomically); `path` is that file if it ends in `.json`, else a
        folder to put it in. Returns the file written."""
        path = Path(path)
        file = path if path.suffix == ".json" else path / "tokenizer.json"
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        os.replace(tmp, file)
        return file

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Reads a `tokenizer.json`, given as the file or the folder holding it."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"no tokenizer file at {file}")
        try:
            backend = _RustTokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception on bad JSON
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{file} is not a valid tokenizer.json: {reason}") from None
        try:
            return cls(backend)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Trains byte-level BPE from an iterator of documents; the special tokens take ids 0..7, the 256
    byte symbols come next, merges fill the rest of `vocab_size`."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(SPECIAL_TOKENS) + len(alphabet):
        raise ValueError(f"vocab_size {vocab_size} is below the {len(SPECIAL_TOKENS) + len(alphabet)} "
                         "special and byte tokens")
    backend = _RustTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet,
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend)


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet (the `ByteLevel` pre-tokenizer's): the printable character that stands
    for each byte in a token's spelling -> that byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]  # the rest map to 256, 257, ... in byte order
    return {**{chr(b): b for b in kept}, **{chr(256 + n): b for n, b in enumerate(moved)}}
