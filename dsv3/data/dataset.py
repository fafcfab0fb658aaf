"""The trainer's view of the data: a tokenised, split, cached corpus and the batches cut from it.

`TokenizedCorpus.build` reads documents (`corpus.py`), tokenises them in parallel batches, splits
whole documents into train and val, applies FIM (`fim.py`) to train documents only, and stores each
split as one flat packed stream d0 EOS d1 EOS ... (`packing.py`) in a `.npy` file. The cache is keyed
by everything the streams depend on (source files' sizes and mtimes, tokenizer, FIM rate, seed, split
settings, byte budget) and written to a temporary folder that is renamed into place, so a crash
leaves no half cache and a second build just memory-maps the files. The streams do not depend on the
sequence length: `BatchIterator` cuts windows from them at train time.

`unigram_baseline_loss` is the loss to beat: what a model that ignores context would score.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from dsv3.data.corpus import (builtin_corpus_path, builtin_files, iter_builtin_documents, iter_documents,
                              limit_bytes, source_files)
from dsv3.data.fim import apply_fim
from dsv3.data.packing import join_documents, num_windows
from dsv3.data.tokenizer import Tokenizer

CACHE_FORMAT = 2  # bump when the stored layout or the build's meaning changes (2: special-token text stays text, FIM cuts whole characters)
MIN_VAL_TOKENS = 16_384  # a few val sequences even at seq_len 4096
_ENCODE_CHUNK_BYTES = 1 << 20  # text per encode_batch call: big enough to use every core


@dataclass(frozen=True)
class TokenizedCorpus:
    train_tokens: np.ndarray  # [N_train] uint16 or uint32, memory-mapped
    val_tokens: np.ndarray  # [N_val]
    meta: dict
    path: Path  # the cache folder

    @property
    def val_bytes(self) -> int:
        """UTF-8 bytes of the val documents' text, for bits per byte."""
        return self.meta["val_bytes"]

    @property
    def val_token_count(self) -> int:
        return len(self.val_tokens)

    @classmethod
    def build(cls, source: str | Path | None, tokenizer: Tokenizer, cache_dir: str | Path,
              val_fraction: float = 0.005, fim_rate: float = 0.1, seed: int = 0,
              max_bytes: int | None = None, min_val_tokens: int = MIN_VAL_TOKENS,
              split_seed: int | None = None) -> TokenizedCorpus:
        """`source` None is the built-in corpus. Val gets `val_fraction` of the documents, at least
        one, topped up to `min_val_tokens` while train keeps at least half of the tokens.  `split_seed`
        draws the split (None: `seed`, which also draws FIM)."""
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        files = builtin_files() if source is None else source_files(source)
        label = f"builtin:{builtin_corpus_path()}" if source is None else str(Path(source).resolve())
        settings = dict(val_fraction=val_fraction, fim_rate=fim_rate, seed=seed, max_bytes=max_bytes,
                        min_val_tokens=min_val_tokens, split_seed=seed if split_seed is None else split_seed)
        key = _cache_key(label, files, tokenizer, settings)
        folder = Path(cache_dir) / key
        if not (folder / "meta.json").is_file():
            docs = (iter_builtin_documents(max_bytes) if source is None
                    else limit_bytes(iter_documents(source), max_bytes))
            estimate = sum(f.stat().st_size for f in files)
            total_bytes = estimate if max_bytes is None else min(estimate, max_bytes)
            _build_cache(folder, docs, total_bytes, tokenizer, settings, dict(key=key, source=label))
        return cls.load(folder)

    @classmethod
    def load(cls, folder: str | Path) -> TokenizedCorpus:
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        return cls(train_tokens=np.load(folder / "train.npy", mmap_mode="r"),
                   val_tokens=np.load(folder / "val.npy", mmap_mode="r"), meta=meta, path=folder)


def _cache_key(label: str, files: list[Path], tokenizer: Tokenizer, settings: dict) -> str:
    # size, mtime, ctime and inode: a rewrite that keeps size and mtime (cp -p, rsync -t) still changes ctime
    stats = [(str(f), s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino) for f in files for s in [f.stat()]]
    record = dict(format=CACHE_FORMAT, source=label, files=stats,
                  tokenizer=hashlib.sha256(tokenizer.to_json().encode()).hexdigest(), **settings)
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _build_cache(folder: Path, docs: Iterable[str], total_bytes: int, tokenizer: Tokenizer,
                 settings: dict, header: dict) -> None:
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    doc_tokens, doc_bytes = _tokenize(docs, tokenizer, dtype, total_bytes)
    if len(doc_tokens) < 2:
        raise ValueError(f"{header['source']}: found {len(doc_tokens)} documents, need at least 2 "
                         "to split into train and val")
    is_val = _split([len(t) for t in doc_tokens], settings["val_fraction"], settings["min_val_tokens"],
                    settings["split_seed"])
    train_docs = [t for t, v in zip(doc_tokens, is_val) if not v]
    val_docs = [t for t, v in zip(doc_tokens, is_val) if v]
    rng = random.Random(settings["seed"])
    mid_character = tokenizer.mid_character_ids
    fim_docs = [apply_fim(t, rng, settings["fim_rate"], tokenizer, mid_character) for t in train_docs]
    train = join_documents(fim_docs, tokenizer.eos_id, dtype)
    val = join_documents(val_docs, tokenizer.eos_id, dtype)
    meta = dict(
        **header, vocab_size=tokenizer.vocab_size, dtype=dtype.name, **settings,
        num_documents=len(doc_tokens), num_train_documents=len(train_docs), num_val_documents=len(val_docs),
        # apply_fim returns its input unless it rewrote the document
        num_fim_documents=sum(f is not t for f, t in zip(fim_docs, train_docs)),
        train_tokens=len(train), val_tokens=len(val),
        train_bytes=sum(b for b, v in zip(doc_bytes, is_val) if not v),
        val_bytes=sum(b for b, v in zip(doc_bytes, is_val) if v),
    )
    _write_atomically(folder, {"train.npy": train, "val.npy": val}, meta)


def _tokenize(docs: Iterable[str], tokenizer: Tokenizer, dtype: np.dtype,
              total_bytes: int) -> tuple[list[np.ndarray], list[int]]:
    """Per document: its token ids and its UTF-8 byte count. `total_bytes` (from file sizes) only
    scales the progress bar: exact for plain text, an estimate for jsonl and parquet."""
    doc_tokens, doc_bytes = [], []
    columns = (TextColumn("tokenising"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns) as progress:
        task = progress.add_task("tokenising", total=total_bytes)
        for chunk, sizes in _chunks(docs, _ENCODE_CHUNK_BYTES):
            doc_tokens += [np.array(ids, dtype=dtype) for ids in tokenizer.encode_text_batch(chunk)]
            doc_bytes += sizes
            progress.advance(task, sum(sizes))
    return doc_tokens, doc_bytes


def _chunks(docs: Iterable[str], chunk_bytes: int) -> Iterator[tuple[list[str], list[int]]]:
    chunk, sizes = [], []
    for doc in docs:
        chunk.append(doc)
        sizes.append(len(doc.encode("utf-8")))
        if sum(sizes) >= chunk_bytes:
            yield chunk, sizes
            chunk, sizes = [], []
    if chunk:
        yield chunk, sizes


def _split(lengths: list[int], val_fraction: float, min_val_tokens: int, seed: int) -> np.ndarray:
    """A bool per document, True for val: documents in a seeded random order go to val until both
    the document quota and the token floor are met; a document that would give val more than half
    of all tokens is passed over (except the first, so val is never empty)."""
    stream_len = [n + 1 for n in lengths]  # + EOS
    half = sum(stream_len) // 2
    quota = max(1, round(val_fraction * len(lengths)))
    is_val = np.zeros(len(lengths), dtype=bool)
    val_docs = val_tokens = 0
    for i in np.random.default_rng(seed).permutation(len(lengths)):
        if val_docs >= quota and val_tokens >= min_val_tokens:
            break
        if val_docs > 0 and val_tokens + stream_len[i] > half:
            continue
        is_val[i] = True
        val_docs += 1
        val_tokens += stream_len[i]
    return is_val


def _write_atomically(folder: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name, array in arrays.items():
            np.save(tmp / name, array)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it 0700: a cache shared between users must be readable
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():  # else another process built it first: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stream_fingerprint(tokens: np.ndarray) -> str:
    """A short hash of a token stream: its length, dtype and up to 2^20 tokens at a fixed stride (all of
    a shorter stream), so that resuming checks the data is the same at any corpus size in milliseconds."""
    step = max(1, len(tokens) // (1 << 20))
    h = hashlib.sha256(f"{len(tokens)}:{tokens.dtype}".encode())
    h.update(np.ascontiguousarray(tokens[::step]).tobytes())
    return h.hexdigest()[:16]


class BatchIterator:
    """Endless shuffled batches of windows of a packed stream.

    Windows of `seq_len + 1` tokens start at multiples of `seq_len` (see `packing.py`). Each epoch
    visits every window once in the order of a permutation seeded by (seed, epoch); a batch may
    straddle two epochs. `state_dict()` is (epoch, position in that epoch's order), enough to resume
    with exactly the batches an uninterrupted run would have seen, whatever the batch sizes asked.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, shuffle: bool = True):
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.num_windows = num_windows(len(tokens), seq_len)
        if self.num_windows == 0:
            raise ValueError(f"a stream of {len(tokens)} tokens is shorter than one window of "
                             f"seq_len + 1 = {seq_len + 1}")
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_windows)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)

    def next_batch(self, batch_size: int | None = None, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both int64 [B, seq_len]; `batch_size` overrides the default for this call.
        `rows` gathers only those rows of the batch (a data-parallel rank's share), while the position still
        advances by the whole batch: every rank keeps the same state and reads only its own windows."""
        batch_size = batch_size or self.batch_size
        windows, count = [], 0
        while count < batch_size:
            take = min(batch_size - count, self.num_windows - self.position)
            windows.append(self._order[self.position: self.position + take])
            count += take
            self.position += take
            if self.position == self.num_windows:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order()
        chosen = np.concatenate(windows)
        return _windows_to_batch(self.tokens, chosen if rows is None else chosen[rows], self.seq_len)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, position=self.position, seed=self.seed, num_windows=self.num_windows,
                    fingerprint=stream_fingerprint(self.tokens))

    def load_state_dict(self, state: dict) -> None:
        if (state["seed"], state["num_windows"]) != (self.seed, self.num_windows):
            raise ValueError(f"batch state is for seed {state['seed']} and {state['num_windows']} windows, "
                             f"this iterator has seed {self.seed} and {self.num_windows}: different data")
        # checkpoints from before the fingerprint was kept resume on the checks above alone
        if "fingerprint" in state and state["fingerprint"] != stream_fingerprint(self.tokens):
            raise ValueError("batch state is for another token stream with as many windows (the corpus or its "
                             "tokenizer changed since the checkpoint): resuming would train on different data")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order()


def iter_eval(tokens: np.ndarray, batch_size: int, seq_len: int,
              max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The stream's windows in order, `batch_size` at a time (the last batch may be smaller), so
    every evaluation sees the same tokens; at most `max_batches` batches."""
    starts = np.arange(num_windows(len(tokens), seq_len))
    for n, first in enumerate(range(0, len(starts), batch_size)):
        if max_batches is not None and n >= max_batches:
            return
        yield _windows_to_batch(tokens, starts[first: first + batch_size], seq_len)


def _windows_to_batch(tokens: np.ndarray, windows: np.ndarray,
                      seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = windows[:, None] * seq_len + np.arange(seq_len + 1)  # [B, seq_len + 1]
    rows = torch.from_numpy(tokens[index].astype(np.int64))  # [B, seq_len + 1]
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def unigram_baseline_loss(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats per token) of the val stream under the add-one-smoothed unigram
    distribution of the train stream."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0  # [vocab]
    log_p = np.log(counts) - np.log(counts.sum())
    return float(-log_p[val_tokens].mean())
