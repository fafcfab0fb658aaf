"""Data pipeline: tokenizer, corpus readers, packing, FIM, the cached dataset and its batches."""

import json
import math
import os
import random
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dsv3.data import (SPECIAL_TOKENS, BatchIterator, FimIds, TokenizedCorpus, Tokenizer, apply_fim,
                       iter_builtin_documents, iter_documents, iter_eval, pack_documents, train_tokenizer,
                       undo_fim, unigram_baseline_loss)
from dsv3.data.corpus import BUILTIN_EXCLUDED_DIRS, builtin_corpus_path, builtin_files, limit_bytes
from dsv3.data.tokenizer import ASSISTANT_TOKEN, BOS_TOKEN, EOS_TOKEN, USER_TOKEN

FIM = FimIds(fim_begin_id=2, fim_hole_id=3, fim_end_id=4)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(iter_builtin_documents(max_bytes=200_000), vocab_size=512)


def random_text(rng: random.Random, n: int) -> str:
    # ASCII, Latin-1, Greek, CJK, emoji, combining marks, controls (NUL, CR, tab) — no surrogates.
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0xFF), (0x370, 0x3FF), (0x4E00, 0x4FFF),
              (0x1F300, 0x1F64F), (0x300, 0x36F)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(n))


# --- tokenizer ---------------------------------------------------------------------------------

def test_special_token_ids(tokenizer):
    assert [tokenizer.encode(t) for t in SPECIAL_TOKENS] == [[i] for i in range(8)]
    ids = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.fim_begin_id, tokenizer.fim_hole_id,
           tokenizer.fim_end_id, tokenizer.user_id, tokenizer.assistant_id, tokenizer.pad_id)
    assert ids == tuple(range(8))
    assert SPECIAL_TOKENS[0] == "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
    assert tokenizer.vocab_size == 512


def test_roundtrip_arbitrary_unicode(tokenizer):
    rng = random.Random(0)
    texts = [random_text(rng, rng.randint(0, 200)) for _ in range(200)]
    texts += ["", " leading space", "def f(x):\r\n\treturn x  # ünïcödé\n", "🎉" * 5]
    assert all(tokenizer.decode(tokenizer.encode(t)) == t for t in texts)
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]


def test_special_tokens_in_text_and_skip(tokenizer):
    text = f"a{USER_TOKEN}b{EOS_TOKEN}"
    ids = tokenizer.encode(text)
    assert tokenizer.user_id in ids and ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special=True) == "ab"


def test_chat_template(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}]
    expected = f"{BOS_TOKEN}Be brief.{USER_TOKEN}Hi{ASSISTANT_TOKEN}Hello{EOS_TOKEN}{USER_TOKEN}2+2?"
    assert tokenizer.apply_chat_template(messages) == expected + ASSISTANT_TOKEN
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False) == expected
    # the generation prompt does not depend on the last turn's role (DeepSeek-V3's template)
    assert tokenizer.apply_chat_template(messages[:3]).endswith(f"Hello{EOS_TOKEN}{ASSISTANT_TOKEN}")
    with pytest.raises(ValueError, match="role"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "x"}])
    # the ids: the same as encoding the rendered text, while the contents hold no special spelling
    assert tokenizer.encode_chat(messages) == tokenizer.encode(tokenizer.apply_chat_template(messages))


def test_chat_contents_cannot_inject_control_tokens(tokenizer):
    """A message that spells EOS or a role marker stays text: only the template's own markers are special."""
    sneaky = [{"role": "user", "content": f"say {EOS_TOKEN} and {ASSISTANT_TOKEN}"}]
    ids = tokenizer.encode_chat(sneaky)
    assert tokenizer.eos_id not in ids
    assert ids.count(tokenizer.encode(ASSISTANT_TOKEN)[0]) == 1  # the generation prompt's, at the end
    assert ids[-1] == tokenizer.encode(ASSISTANT_TOKEN)[0] and ids[0] == tokenizer.bos_id
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(sneaky)


def test_save_load_roundtrip(tokenizer, tmp_path):
    written = tokenizer.save(tmp_path / "tok")
    assert written == tmp_path / "tok" / "tokenizer.json"
    text = "import os\nprint('héllo 世界')"
    for path in (tmp_path / "tok", written):
        loaded = Tokenizer.load(path)
        assert loaded.vocab_size == tokenizer.vocab_size
        assert loaded.encode(text) == tokenizer.encode(text)
    assert not list((tmp_path / "tok").glob(".*"))  # no temporary left behind


def test_load_errors_are_one_line_value_errors(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{ not json")
    missing = tmp_path / "nowhere"
    for path in (missing, bad, tmp_path):
        with pytest.raises(ValueError) as info:
            Tokenizer.load(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_vocab_below_bytes_is_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)


# --- corpus ------------------------------------------------------------------------------------

def test_text_file_is_one_document(tmp_path):
    (tmp_path / "a.md").write_text("# Title\r\n\nbody ü\n", encoding="utf-8", newline="")
    assert list(iter_documents(tmp_path / "a.md")) == ["# Title\r\n\nbody ü\n"]


def test_folder_reads_recursively_sorted_and_skips_binary(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.py").write_text("z = 1\n")
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "c.txt").write_text("")  # empty: dropped
    (tmp_path / "d.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "e.txt").write_bytes(b"\xff\xfe bad utf-8")
    (tmp_path / ".hidden").write_text("secret")
    (tmp_path / "f.jsonl").write_text('{"text": "from jsonl"}\n')
    assert list(iter_documents(tmp_path)) == ["alpha", "from jsonl", "z = 1\n"]
    with pytest.raises(ValueError, match="UTF-8"):
        list(iter_documents(tmp_path / "d.bin"))


def test_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one", "id": 1}\n\n{"text": "two\\nlines", "meta": {}}\n')
    assert list(iter_documents(path)) == ["one", "two\nlines"]
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"docs\.jsonl:2.*'text'"):
        list(iter_documents(path))


def test_parquet(tmp_path):
    texts = [f"doc {i} ✓" for i in range(2500)]  # more rows than one record batch
    pq.write_table(pa.table({"id": list(range(2500)), "text": texts}), tmp_path / "d.parquet")
    assert list(iter_documents(tmp_path / "d.parquet")) == texts
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "e.parquet")
    with pytest.raises(ValueError, match="'text'"):
        list(iter_documents(tmp_path / "e.parquet"))


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        list(iter_documents(tmp_path / "nope"))


def test_limit_bytes_cuts_at_a_character_boundary():
    docs = ["aaaa", "ééé", "bbbb"]  # 4 + 6 + 4 bytes
    assert list(limit_bytes(docs, 7)) == ["aaaa", "é"]
    assert list(limit_bytes(docs, None)) == docs


def test_builtin_corpus():
    files = builtin_files()
    root = builtin_corpus_path()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any(set(f.relative_to(root).parts) & BUILTIN_EXCLUDED_DIRS for f in files)
    docs = list(iter_builtin_documents(max_bytes=50_000))
    assert sum(len(d.encode()) for d in docs) == 50_000
    assert docs == list(iter_builtin_documents(max_bytes=50_000))


# --- packing and FIM ---------------------------------------------------------------------------

def test_packing_preserves_tokens():
    rng = random.Random(1)
    docs = [[rng.randint(10, 99) for _ in range(rng.randint(0, 30))] for _ in range(50)]
    seq_len, eos = 7, 1
    rows = list(pack_documents(docs, seq_len, eos_id=eos))
    assert all(r.shape == (seq_len + 1,) and r.dtype == np.int64 for r in rows)
    stream = [t for d in docs for t in d + [eos]]
    assert all(a[-1] == b[0] for a, b in zip(rows, rows[1:]))  # one shared token between rows
    rebuilt = list(rows[0]) + [t for r in rows[1:] for t in r[1:]]
    assert rebuilt == stream[:len(rebuilt)] and len(stream) - len(rebuilt) < seq_len


def test_fim_is_invertible_and_applied_at_rate():
    rng = random.Random(0)
    docs = [[rng.randint(8, 500) for _ in range(rng.randint(0, 60))] for _ in range(4000)]
    out = [apply_fim(d, rng, 0.1, FIM) for d in docs]
    assert all(undo_fim(o, FIM) == d for o, d in zip(out, docs))
    changed = [o for o, d in zip(out, docs) if o is not d]
    assert 0.08 < len(changed) / len(docs) < 0.12
    assert all(o[0] == FIM.fim_begin_id and len(o) == len(d) + 3 for o, d in zip(out, docs) if o is not d)
    forced = apply_fim(list(range(10, 20)), random.Random(3), 1.0, FIM)
    i, j = forced.index(FIM.fim_hole_id), forced.index(FIM.fim_end_id)
    assert forced[1:i] + forced[j + 1:] + forced[i + 1:j] == list(range(10, 20))  # prefix middle suffix


# --- dataset -----------------------------------------------------------------------------------

def make_corpus(path, n_docs=60):
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "class", "(", ")", ":", "\n"]
    path.mkdir()
    for i in range(n_docs):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(20, 200)))
        (path / f"doc{i:03d}.txt").write_text(f"document {i}: {body}")
    return path


def build(source, tokenizer, cache, **kwargs):
    kwargs = dict(val_fraction=0.05, fim_rate=0.3, seed=0, min_val_tokens=200) | kwargs
    return TokenizedCorpus.build(source, tokenizer, cache, **kwargs)


def split_docs(stream, eos):
    docs, start = [], 0
    for i in np.flatnonzero(np.asarray(stream) == eos):
        docs.append(tuple(int(t) for t in stream[start:i]))
        start = i + 1
    return docs


def test_dataset_cache_hit_returns_identical_arrays(tokenizer, tmp_path):
    source = make_corpus(tmp_path / "corpus")
    first = build(source, tokenizer, tmp_path / "cache")
    start = time.perf_counter()
    second = build(source, tokenizer, tmp_path / "cache")
    assert time.perf_counter() - start < 0.5
    assert second.path == first.path and isinstance(second.train_tokens, np.memmap)
    np.testing.assert_array_equal(first.train_tokens, second.train_tokens)
    np.testing.assert_array_equal(first.val_tokens, second.val_tokens)
    assert first.train_tokens.dtype == np.uint16
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.path.name]  # no temporaries
    meta = json.loads((first.path / "meta.json").read_text())
    assert meta["num_documents"] == 60 and meta["val_tokens"] == first.val_token_count
    assert meta["train_tokens"] == len(first.train_tokens) and first.val_bytes == meta["val_bytes"] > 0
    # Another setting, or a touched source file, is another cache entry.
    assert build(source, tokenizer, tmp_path / "cache", fim_rate=0.0).path != first.path
    (source / "doc000.txt").write_text("changed")
    assert build(source, tokenizer, tmp_path / "cache").path != first.path


def test_val_split_is_nonempty_disjoint_and_fim_free(tokenizer, tmp_path):
    source = make_corpus(tmp_path / "corpus")
    data = build(source, tokenizer, tmp_path / "cache")
    eos = tokenizer.eos_id
    train = [tuple(undo_fim(d, tokenizer)) for d in split_docs(data.train_tokens, eos)]
    val = split_docs(data.val_tokens, eos)
    originals = {tuple(ids) for ids in tokenizer.encode_batch(list(iter_documents(source)))}
    assert len(val) >= 1 and data.val_token_count >= 200
    assert set(train) | set(val) == originals and not set(train) & set(val)
    assert not any(tokenizer.fim_begin_id in d for d in val)
    assert data.meta["num_fim_documents"] > 0
    assert data.val_bytes == sum(len(tokenizer.decode(d).encode()) for d in val)


def test_split_seed_alone_draws_the_split(tokenizer, tmp_path):
    """The training seed draws FIM, not the split: runs of a seed sweep validate on the same documents."""
    source = make_corpus(tmp_path / "corpus")
    base = build(source, tokenizer, tmp_path / "cache", seed=0, split_seed=0)
    other_seed = build(source, tokenizer, tmp_path / "cache", seed=1, split_seed=0)
    np.testing.assert_array_equal(base.val_tokens, other_seed.val_tokens)
    assert not np.array_equal(base.train_tokens, other_seed.train_tokens)  # FIM rewrote other documents
    other_split = build(source, tokenizer, tmp_path / "cache", seed=0, split_seed=1)
    assert not np.array_equal(base.val_tokens, other_split.val_tokens)
    np.testing.assert_array_equal(build(source, tokenizer, tmp_path / "cache", seed=1).val_tokens,
                                  build(source, tokenizer, tmp_path / "cache", seed=0, split_seed=1).val_tokens)  # None: seed


def test_builtin_source_with_byte_budget(tokenizer, tmp_path):
    data = build(None, tokenizer, tmp_path / "cache", max_bytes=30_000)
    assert data.meta["train_bytes"] + data.val_bytes == 30_000
    assert data.meta["source"].startswith("builtin:")


def test_batch_iterator_rows_are_the_batch_s_rows_and_keep_the_state():
    """A data-parallel rank gathers only its rows; the position advances by the whole batch, across epochs."""
    tokens = np.arange(1, 10 * 8 + 2, dtype=np.uint16)
    whole, part = (BatchIterator(tokens, batch_size=4, seq_len=8, seed=3) for _ in range(2))
    for size, rows in ((4, slice(0, 2)), (5, slice(2, 4)), (7, slice(5, 7))):  # the third straddles an epoch
        want, got = whole.next_batch(size), part.next_batch(size, rows=rows)
        assert torch.equal(got[0], want[0][rows]) and torch.equal(got[1], want[1][rows])
        assert part.state_dict() == whole.state_dict()


def test_batch_iterator_shapes_epochs_and_resume():
    tokens = np.arange(1, 10 * 8 + 2, dtype=np.uint16)  # 81 tokens: 10 windows of 9 at stride 8
    it = BatchIterator(tokens, batch_size=3, seq_len=8, seed=5)
    x, y = it.next_batch()
    assert x.shape == y.shape == (3, 8) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert all((x[:, 0] - 1) % 8 == 0)  # windows start at multiples of seq_len
    seen = [x] + [it.next_batch(batch_size=b)[0] for b in (4, 2, 1)]  # exactly one epoch
    assert sorted(torch.cat(seen)[:, 0].tolist()) == list(range(1, 81, 8)) and it.epoch == 1
    it.next_batch(batch_size=7)  # crosses into epoch 2
    state = it.state_dict()
    expected = [it.next_batch(batch_size=b) for b in (5, 3, 11)]
    resumed = BatchIterator(tokens, batch_size=3, seq_len=8, seed=5)
    resumed.load_state_dict(state)
    got = [resumed.next_batch(batch_size=b) for b in (5, 3, 11)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, got))
    with pytest.raises(ValueError, match="seed"):
        BatchIterator(tokens, batch_size=3, seq_len=8, seed=6).load_state_dict(state)


def test_iter_eval_is_ordered_and_bounded():
    tokens = np.arange(0, 50, dtype=np.uint16)  # 49 // 8 = 6 windows
    batches = list(iter_eval(tokens, batch_size=4, seq_len=8))
    assert [b[0].shape[0] for b in batches] == [4, 2]
    assert torch.cat([b[0] for b in batches])[:, 0].tolist() == list(range(0, 48, 8))
    assert len(list(iter_eval(tokens, batch_size=1, seq_len=8, max_batches=3))) == 3


def test_unigram_baseline_loss():
    vocab = 4
    train = np.array([0, 0, 1, 2], dtype=np.uint16)  # smoothed counts 3 2 2 1 of 8
    val = np.array([0, 3], dtype=np.uint16)
    assert unigram_baseline_loss(train, val, vocab) == pytest.approx(-(math.log(3 / 8) + math.log(1 / 8)) / 2)
    assert unigram_baseline_loss(np.empty(0, np.uint16), val, vocab) == pytest.approx(math.log(vocab))


# --- found by the data audit -------------------------------------------------------------------

def test_special_token_spellings_in_corpus_text_stay_text(tokenizer, tmp_path):
    """A document quoting `<｜end▁of▁sentence｜>` or a FIM marker is not split by a stray EOS nor given
    stray FIM structure: one EOS per document, and the text round-trips."""
    src = make_corpus(tmp_path / "src", n_docs=10)
    quoted = f"print('{EOS_TOKEN}') and {SPECIAL_TOKENS[2]} in a string"
    (src / "doc_quote.txt").write_text(quoted)
    corpus = build(src, tokenizer, tmp_path / "cache", fim_rate=0.0, val_fraction=0.1, min_val_tokens=1)
    streams = np.concatenate([corpus.train_tokens, corpus.val_tokens])
    assert (streams == tokenizer.eos_id).sum() == 11
    assert (streams == tokenizer.fim_begin_id).sum() == 0
    assert quoted in tokenizer.decode(streams)


def test_fim_never_cuts_inside_a_character():
    tok = train_tokenizer(["漢字 😀 text, 漢字 more 😀"] * 30, vocab_size=300)
    doc = tok.encode_text_batch(["漢字😀 and ünïcödé 😀漢"])[0]
    assert any(t in tok.mid_character_ids for t in doc)  # the case exists in this document
    rng = random.Random(0)
    for _ in range(200):
        out = apply_fim(doc, rng, 1.0, tok, tok.mid_character_ids)
        hole, end = out.index(tok.fim_hole_id), out.index(tok.fim_end_id)
        for piece in (out[1:hole], out[hole + 1:end], out[end + 1:]):
            assert "\ufffd" not in tok.decode(piece)
        assert undo_fim(out, tok) == doc


def test_released_v3_pad_spelling_loads(tmp_path):
    """DeepSeek-V3's tokenizer.json spells pad `<｜▁pad▁｜>`; pad is optional here."""
    data = json.loads(train_tokenizer(["some text"] * 10, vocab_size=300).to_json())
    for entry in data["added_tokens"]:
        if entry["content"] == SPECIAL_TOKENS[-1]:
            entry["content"] = "<｜▁pad▁｜>"
    data["model"]["vocab"] = {("<｜▁pad▁｜>" if k == SPECIAL_TOKENS[-1] else k): v for k, v in data["model"]["vocab"].items()}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    tok = Tokenizer.load(tmp_path)
    assert tok.pad_id == 7 and tok.eos_id == 1


def test_corpus_errors_name_the_place(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"text": "ok"}\n{"text": "\\ud83d"}\n')
    (tmp_path / "l.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    for name, message in (("s.jsonl", "s.jsonl:2: .*surrogate"), ("l.jsonl", "l.jsonl:1: not UTF-8"),
                          ("n.parquet", "holds int64")):
        with pytest.raises(ValueError, match=message):
            list(iter_documents(str(tmp_path / name)))


def test_linked_folders_are_read_once(tmp_path):
    real, top = tmp_path / "real", tmp_path / "top"
    real.mkdir()
    top.mkdir()
    (real / "x.txt").write_text("linked document")
    (top / "linkdir").symlink_to(real)
    (real / "loop").symlink_to(top)  # a cycle ends
    assert list(iter_documents(str(top))) == ["linked document"]


def test_suffix_case_byte_order_mark_and_cache_mode(tokenizer, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.JSONL").write_text('{"text": "from upper-case jsonl"}\n')
    (tmp_path / "d" / "b.txt").write_bytes("\ufeffwith a byte-order mark".encode("utf-8"))
    (tmp_path / "d" / "c.jsonl").write_bytes('\ufeff{"text": "jsonl with a byte-order mark"}\n'.encode("utf-8"))
    assert list(iter_documents(str(tmp_path / "d"))) == ["from upper-case jsonl", "with a byte-order mark",
                                                          "jsonl with a byte-order mark"]
    corpus = build(make_corpus(tmp_path / "src", n_docs=10), tokenizer, tmp_path / "cache")
    umask = os.umask(0)
    os.umask(umask)
    assert corpus.path.stat().st_mode & 0o777 == 0o777 & ~umask  # the umask's, not mkdtemp's 0700


def test_byte_lengths_and_scored_text_count_the_scored_bytes_exactly(tokenizer):
    """Bits per byte divides by the bytes of exactly the targets scored: per-id byte lengths (special
    tokens 0) summed over tokens[1 : 1 + windows * seq_len], as the text they decode to."""
    import numpy as np

    from dsv3.train.evaluate import scored_text

    def stream_of(docs):
        ids = []
        for d in docs:
            ids += tokenizer.encode_text_batch([d])[0] + [tokenizer.eos_id]
        return np.array(ids)

    rng = random.Random(0)
    lengths = tokenizer.byte_lengths()
    assert lengths[tokenizer.eos_id] == 0 and lengths[tokenizer.bos_id] == 0
    unicode_docs = [random_text(rng, 200) for _ in range(6)]  # multi-byte characters split across ids
    assert int(lengths[stream_of(unicode_docs)].sum()) == sum(len(d.encode()) for d in unicode_docs)
    # ASCII documents: any slice of ids decodes to whole characters, so the decoded text is the reference
    stream = stream_of(["".join(rng.choice("abc def_(x):\n\t0123") for _ in range(300)) for _ in range(6)])
    for seq_len, batch, max_batches in ((32, 2, 3), (50, 4, None)):
        n, n_bytes = scored_text(stream, seq_len, batch, max_batches, lengths)
        windows = (len(stream) - 1) // seq_len
        assert n == seq_len * (windows if max_batches is None else min(windows, batch * max_batches))
        assert n_bytes == len(tokenizer.decode(stream[1:1 + n], skip_special=True).encode())


def test_batch_state_refuses_another_stream_with_as_many_windows():
    """A resume checks the token stream itself, not only its window count (a corpus or tokenizer that
    changed since the checkpoint would otherwise resume silently on other data)."""
    import numpy as np

    from dsv3.data.dataset import BatchIterator

    tokens = np.random.default_rng(0).integers(0, 500, 4 * 64 + 1).astype(np.uint16)
    it = BatchIterator(tokens, 2, 64, seed=0)
    it.next_batch()
    state = it.state_dict()
    BatchIterator(tokens.copy(), 2, 64, seed=0).load_state_dict(state)  # the same data: fine
    edited = tokens.copy()
    edited[100] += 1
    with pytest.raises(ValueError, match="another token stream"):
        BatchIterator(edited, 2, 64, seed=0).load_state_dict(state)
    old = {k: v for k, v in state.items() if k != "fingerprint"}  # a checkpoint from before fingerprints
    BatchIterator(edited, 2, 64, seed=0).load_state_dict(old)

