"""Data pipeline: tokenizer, corpus readers, FIM, packing, and the cached dataset the trainer uses."""

from dsv3.data.corpus import builtin_corpus_path, iter_builtin_documents, iter_documents
from dsv3.data.dataset import BatchIterator, TokenizedCorpus, iter_eval, unigram_baseline_loss
from dsv3.data.fim import FimIds, apply_fim, undo_fim
from dsv3.data.packing import pack_documents
from dsv3.data.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

__all__ = [
    "SPECIAL_TOKENS", "BatchIterator", "FimIds", "TokenizedCorpus", "Tokenizer", "apply_fim",
    "builtin_corpus_path", "iter_builtin_documents", "iter_documents", "iter_eval", "pack_documents",
    "train_tokenizer", "undo_fim", "unigram_baseline_loss",
]
