"""Everything a run needs from its data: a tokenizer (loaded, or trained on the corpus and cached),
the tokenised, FIM-augmented, train/val-split corpus (cached), and the unigram baseline loss."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from ..data.corpus import builtin_files, iter_builtin_documents, iter_documents, limit_bytes, source_files
from ..data.dataset import TokenizedCorpus, unigram_baseline_loss
from ..data.packing import num_windows
from ..data.tokenizer import Tokenizer, train_tokenizer
from .config import TrainConfig

TOKENIZER_TRAIN_BYTES = 32 << 20  # train the BPE on at most the first 32 MB of the corpus


@dataclass
class RunData:
    tokenizer: Tokenizer
    corpus: TokenizedCorpus
    unigram_loss: float
    source: str

    def describe(self) -> str:
        m = self.corpus.meta
        return (f"{self.source}: {len(self.corpus.train_tokens):,} train / {self.corpus.val_token_count:,} val tokens, "
                f"vocab {self.tokenizer.vocab_size}, unigram baseline {self.unigram_loss:.3f} nats/token"
                + (f", {m['num_documents']:,} documents" if "num_documents" in m else ""))


def _files(data: str | None) -> list[Path]:
    return builtin_files() if data is None else source_files(data)


def _tokenizer_for(cfg: TrainConfig, vocab_size: int, cache: Path, console: Console) -> Tokenizer:
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in _files(cfg.data)]
    key = hashlib.sha256(json.dumps([stats, vocab_size, cfg.max_data_bytes]).encode()).hexdigest()[:16]
    path = cache / "tokenizers" / f"{key}.json"
    if path.is_file():
        return Tokenizer.load(path)
    budget = min(TOKENIZER_TRAIN_BYTES, cfg.max_data_bytes or TOKENIZER_TRAIN_BYTES)
    docs = iter_builtin_documents(budget) if cfg.data is None else limit_bytes(iter_documents(cfg.data), budget)
    with console.status(f"training a {vocab_size}-token byte-level BPE tokenizer"):
        tokenizer = train_tokenizer(docs, vocab_size)
    tokenizer.save(path)
    return tokenizer


def prepare_data(cfg: TrainConfig, model_vocab: int, tokenizer_source: str | None, console: Console) -> RunData:
    """Raises FileNotFoundError / ValueError with one-line messages for bad inputs, before any output."""
    _files(cfg.data)  # a missing path fails here, first
    cache = Path(cfg.cache_dir).expanduser()
    if tokenizer_source:
        tokenizer = Tokenizer.load(tokenizer_source)
    else:
        tokenizer = _tokenizer_for(cfg, cfg.vocab_size or model_vocab, cache, console)
    if tokenizer.vocab_size > model_vocab:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the {cfg.preset!r} preset's embedding has {model_vocab}")
    corpus = run_corpus(cfg, tokenizer)
    for split, tokens in (("train", corpus.train_tokens), ("validation", corpus.val_tokens)):
        if num_windows(len(tokens), cfg.seq_len) < 1:  # else the run would stop at its first validation
            raise ValueError(f"the {split} split holds {len(tokens):,} tokens, less than one sequence of "
                             f"{cfg.seq_len + 1}: more data, or a smaller --seq-len")
    unigram = unigram_baseline_loss(corpus.train_tokens, corpus.val_tokens, tokenizer.vocab_size)
    return RunData(tokenizer, corpus, unigram, "built-in corpus (Python stdlib sources)" if cfg.data is None else cfg.data)


def run_corpus(cfg: TrainConfig, tokenizer: Tokenizer) -> TokenizedCorpus:
    """The run's tokenised corpus (cached): its data, seed, FIM rate and byte budget fix the train/val split,
    so `dsv3 eval` rebuilds the very split a run validated on from the run's train_config.json."""
    return TokenizedCorpus.build(cfg.data, tokenizer, Path(cfg.cache_dir).expanduser() / "corpora", fim_rate=cfg.fim_rate,
                                 seed=cfg.seed, split_seed=cfg.val_seed, max_bytes=cfg.max_data_bytes, min_val_tokens=max(16384, 4 * (cfg.seq_len + 1)))
