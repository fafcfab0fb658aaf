"""Readers that turn a path into a deterministic stream of text documents.

A path is one of:
- a text file of any suffix: one document;
- a `.jsonl` file: one document per line, from its `text` field (other fields ignored);
- a `.parquet` file: one document per row of its `text` column, read in record batches (pyarrow);
- a folder: every file below it in sorted order, each read by the rules above; hidden entries and
  files that are not UTF-8 text (a NUL byte or an undecodable sequence) are skipped.

The built-in corpus is the running Python's own standard library source (`.py` files). It is real,
varied, non-trivial text (code, docstrings, comments) that exists on every machine with Python, so
the demo needs no download and no network. Tests, IDLE, lib2to3, installed packages, generated codec
tables (`encodings/`), machine-specific build files and files over 512 KB are left out; what remains
is a few MB (about 9 MB in ~470 files for CPython 3.11).

Empty documents are dropped everywhere. Nothing here tokenises or caches: see `dataset.py`.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

BUILTIN_EXCLUDED_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages",
                         "encodings", "__pycache__", "lib-dynload", "ensurepip"}
BUILTIN_MAX_FILE_BYTES = 512 * 1024
_PARQUET_BATCH_ROWS = 1024


def source_files(path: str | Path) -> list[Path]:
    """The files a path stands for, in reading order (used for reading and for cache keys)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        return _walk(path, lambda d: not d.startswith("."), lambda f: not f.name.startswith("."))
    raise FileNotFoundError(f"no such file or folder: {path}")


def iter_documents(path: str | Path) -> Iterator[str]:
    path = Path(path)
    for file in source_files(path):
        kind = file.suffix.lower()  # .JSONL is a .jsonl
        if kind == ".jsonl":
            docs = _iter_jsonl(file)
        elif kind == ".parquet":
            docs = _iter_parquet(file)
        else:
            text = _read_text(file)
            if text is None:
                if file == path:  # a file named directly must be readable; in a folder it is skipped
                    raise ValueError(f"{file} is not a UTF-8 text file")
                continue
            docs = [text]
        yield from (doc for doc in docs if doc)


def builtin_corpus_path() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def builtin_files() -> list[Path]:
    def keep_dir(name: str) -> bool:
        # config-3.x-<platform>/ holds the interpreter's build files, not library code.
        return name not in BUILTIN_EXCLUDED_DIRS and not name.startswith((".", "config-"))

    def keep_file(file: Path) -> bool:
        # _sysconfigdata_*.py is generated at build time and differs between machines.
        return (file.suffix == ".py" and not file.name.startswith("_sysconfigdata")
                and file.stat().st_size <= BUILTIN_MAX_FILE_BYTES)

    return _walk(builtin_corpus_path(), keep_dir, keep_file)


def iter_builtin_documents(max_bytes: int | None = None) -> Iterator[str]:
    docs = (text for file in builtin_files() if (text := _read_text(file)))
    return limit_bytes(docs, max_bytes)


def limit_bytes(docs: Iterable[str], max_bytes: int | None) -> Iterator[str]:
    """Passes documents through until `max_bytes` UTF-8 bytes; the last one is cut to fit exactly
    (at a character boundary), so a byte budget is a budget."""
    if max_bytes is None:
        yield from docs
        return
    left = max_bytes
    for doc in docs:
        data = doc.encode("utf-8")
        if len(data) >= left:
            if tail := data[:left].decode("utf-8", errors="ignore"):
                yield tail
            return
        left -= len(data)
        yield doc


def _walk(root: Path, keep_dir, keep_file) -> list[Path]:
    """Files under root in a fixed order; linked folders are followed (as linked files are read), each real
    folder once, so a link loop ends."""
    files, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if keep_dir(d))  # prune and fix the visiting order
        files.extend(f for f in (Path(dirpath) / name for name in sorted(filenames)) if keep_file(f))
    return files


def _read_text(file: Path) -> str | None:
    """The file's text, or None when it is binary or not UTF-8."""
    with open(file, "rb") as f:
        if b"\0" in f.read(8192):  # cheap early exit for large binaries
            return None
        f.seek(0)
        data = f.read()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8-sig")  # a leading byte-order mark is not text
    except UnicodeDecodeError:
        return None


def _iter_jsonl(file: Path) -> Iterator[str]:
    with open(file, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark may open the file
            except UnicodeDecodeError:
                raise ValueError(f"{file}:{lineno}: not UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{file}:{lineno}: expected an object with a string field 'text'")
            yield _checked_text(record["text"], f"{file}:{lineno}")


def _checked_text(text: str, where: str) -> str:
    """JSON may escape lone surrogates (\\ud83d), which no UTF-8 encoder takes: refuse them here, by place."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where}: the text holds a lone surrogate (not valid Unicode)") from None
    return text


def _iter_parquet(file: Path) -> Iterator[str]:
    parquet = pq.ParquetFile(file)
    if "text" not in parquet.schema_arrow.names:
        raise ValueError(f"{file}: no 'text' column (columns: {parquet.schema_arrow.names})")
    kind = parquet.schema_arrow.field("text").type
    if kind not in (pa.string(), pa.large_string()):
        raise ValueError(f"{file}: the 'text' column holds {kind}, not strings")
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=["text"]):
        yield from (text for text in batch.column(0).to_pylist() if text)
