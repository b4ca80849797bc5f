"""Text data: the byte-level BPE tokenizer, the pydoc corpus, text sources and their
errors, text shards read back through ShardStream and the training loader."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from cl_core.data import shards as S
from cl_core.data.reader import ShardStream, sample_pipeline, training_loader
from cl_core.data.text import (
    TOKENIZER_FILE,
    TextSource,
    TextSourceError,
    TextTransform,
    decode_text,
    embed_text_split,
    load_text_split,
    load_tokenizer,
    text_stream,
    write_text_shards,
)
from cl_core.engine import LoopConfig, TrainingLoop
from cl_core.methods.simcse import SimCSE
from cl_core.text.corpus import python_docs_sentences, write_corpus
from cl_core.text.tokenizer import (
    BYTE_OFFSET,
    CLS,
    FIRST_MERGE,
    PAD,
    SEP,
    Tokenizer,
    split_pieces,
    train_bpe,
)

ROUND_TRIP = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces, double  spaces\tand a tab\n",
    "snake_case_names, 3.14159 and x**2 >= 10; isn't it?",
    "naïve café, Straße, Ελληνικά, русский, 東京タワー, 한국어, emoji 🙂👍🏽, e\u0301 (combining)",
    "",
    "\u0000 control \u007f chars \u2028 separators",
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return python_docs_sentences(300)


@pytest.fixture(scope="module")
def tokenizer(corpus) -> Tokenizer:
    return train_bpe(corpus, 600)


# ---- tokenizer ----------------------------------------------------------------------


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_decode_encode_round_trip_ascii_and_non_ascii(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids[0] == CLS and ids[-1] == SEP and PAD not in ids
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text
    assert "".join(split_pieces(text)) == text


def test_merges_shorten_known_text_and_every_corpus_sentence_round_trips(tokenizer, corpus):
    for s in corpus:
        ids = tokenizer.encode(s)
        assert tokenizer.decode(ids) == s
        assert len(ids) - 2 < len(s.encode("utf-8"))  # merges were learned and used
    assert tokenizer.vocab_size == 600


def test_truncation_keeps_cls_and_sep(tokenizer, corpus):
    long = " ".join(corpus[:3])
    ids = tokenizer.encode(long, max_len=10)
    assert len(ids) == 10 and ids[0] == CLS and ids[-1] == SEP
    assert ids[1:-1] == tokenizer.tokens(long)[:8]
    assert tokenizer.encode("a", max_len=10) == [CLS, BYTE_OFFSET + ord("a"), SEP]
    assert tokenizer.encode(long, max_len=2) == [CLS, SEP]
    with pytest.raises(ValueError, match="max_len"):
        tokenizer.encode("a", max_len=1)


def test_training_by_hand_min_frequency_and_tie_break():
    a, b, sp = BYTE_OFFSET + ord("a"), BYTE_OFFSET + ord("b"), BYTE_OFFSET + ord(" ")
    # pieces "ab" x1, " ab" x2, "xy" x1: (a, b) 3 times, then (" ", ab) 2 times; (x, y) once < 2
    tok = train_bpe(["ab ab ab", "xy"], 1000, min_frequency=2)
    assert tok.merges == [(a, b), (sp, FIRST_MERGE)] and tok.vocab_size == FIRST_MERGE + 2
    assert tok.tokens(" ab ab") == [FIRST_MERGE + 1, FIRST_MERGE + 1]
    # equal counts: the pair with the smaller ids first
    c, d = BYTE_OFFSET + ord("c"), BYTE_OFFSET + ord("d")
    assert train_bpe(["cd", "ab"], 1000, min_frequency=1).merges == [(a, b), (c, d)]
    # the vocabulary limit
    assert train_bpe(["abcdef " * 5], FIRST_MERGE + 2).vocab_size == FIRST_MERGE + 2
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["x"], 100)


def test_training_is_deterministic_and_order_independent(corpus, tokenizer):
    again = train_bpe(corpus, 600)
    shuffled = list(corpus)
    random.Random(1).shuffle(shuffled)
    assert again == tokenizer and train_bpe(shuffled, 600) == tokenizer


def test_save_load(tmp_path, tokenizer, corpus):
    path = tokenizer.save(tmp_path / "tok.json")
    loaded = Tokenizer.load(path)
    assert loaded == tokenizer and loaded.vocab_size == tokenizer.vocab_size
    assert all(loaded.encode(s, 16) == tokenizer.encode(s, 16) for s in corpus[:50] + ROUND_TRIP)
    d = json.loads(path.read_text())
    assert d["special_tokens"] == ["[PAD]", "[CLS]", "[SEP]", "[UNK]"] and d["byte_offset"] == BYTE_OFFSET
    d["merges"].append([5, 10**6])
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="merge"):
        Tokenizer.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Tokenizer.load(tmp_path / "missing.json")


# ---- corpus -------------------------------------------------------------------------


def test_pydoc_corpus_is_deterministic_deduplicated_prose(tmp_path):
    s = python_docs_sentences()
    assert len(s) > 1000 and len(set(s)) == len(s)
    assert python_docs_sentences(50) == s[:50]
    assert all(5 <= len(x.split()) <= 50 and x[-1] in ".!?" and "\n" not in x for x in s)
    n = write_corpus(tmp_path / "c.txt", limit=20)
    assert n == 20 and (tmp_path / "c.txt").read_text(encoding="utf-8").splitlines() == s[:20]


# ---- text sources -------------------------------------------------------------------


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = [json.dumps({"text": f"sentence number {i}", "label": i % 2}) for i in range(4)]


@pytest.mark.parametrize(
    "bad, why",
    [
        ('{"text": "unterminated', "invalid JSON"),
        ('["text", "a list"]', "expected a JSON object"),
        ('{"label": 1}', 'missing "text"'),
        ('{"text": "   ", "label": 1}', '"text" is empty'),
        ('{"text": 5, "label": 1}', '"text" must be a string'),
        ('{"text": "ok", "label": 1.5}', '"label" must be a non-negative integer, got 1.5'),
        ('{"text": "ok", "label": "2"}', '"label" must be a non-negative integer'),
        ('{"text": "ok", "label": true}', '"label" must be a non-negative integer, got true'),
        ('{"text": "ok", "label": -1}', '"label" must be a non-negative integer, got -1'),
        ('{"text": "ok"}', 'missing "label"'),
    ],
)
def test_bad_jsonl_line_is_named_by_file_and_line(tmp_path, bad, why):
    # line 3 is blank (skipped, but counted in the numbering), the bad line is line 4
    path = _jsonl(tmp_path / "data.jsonl", [GOOD[0], GOOD[1], "", bad, GOOD[2]])
    with pytest.raises(TextSourceError, match=rf"data\.jsonl:4: .*{re.escape(why)}") as e:
        TextSource(path)
    assert "\n" not in str(e.value) and "1 bad of 4" in str(e.value)


def test_a_few_bad_lines_are_skipped_counted_and_listed(tmp_path):
    lines = [json.dumps({"text": f"sentence {i}"}) for i in range(199)]
    lines.insert(50, "{not json")
    src = TextSource(_jsonl(tmp_path / "d.jsonl", lines))  # 1 of 200 bad: within the default 1%
    assert len(src) == 199 and not src.labeled
    assert [b["line"] for b in src.bad] == [51] and "d.jsonl:51: invalid JSON" in src.bad[0]["error"]
    m = write_text_shards(
        src,
        tmp_path / "s",
        val_fraction=0.1,
        test_fraction=0.1,
        samples_per_shard=64,
        min_shards=1,
        seed=0,
        tokenizer_vocab_size=300,
    )
    assert m["num_corrupt"] == 1 and m["corrupt"][0]["id"] == "d.jsonl:51"
    assert m["num_samples"] == 199 and m["num_source_samples"] == 200
    with pytest.raises(TextSourceError, match="d.jsonl:51"):
        TextSource(tmp_path / "d.jsonl", max_bad_fraction=0.0)


def test_txt_source_skips_blank_lines_and_names_bad_utf8(tmp_path):
    p = tmp_path / "s.txt"
    p.write_bytes("\ufeffFirst sentence.\n\n  Second one, indented.  \r\n\nThird: é.\n".encode())
    src = TextSource(p)
    assert src.texts == ["First sentence.", "Second one, indented.", "Third: é."] and src.lines == [1, 3, 5]
    assert src.labels == [-1, -1, -1] and src.class_names == []
    p.write_bytes(b"fine\n\xff\xfe broken\nfine too\n")
    with pytest.raises(TextSourceError, match=r"s\.txt:2: not valid UTF-8"):
        TextSource(p)


def test_source_file_errors(tmp_path):
    with pytest.raises(TextSourceError, match="does not exist"):
        TextSource(tmp_path / "nope.txt")
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(TextSourceError, match=r"\.txt .* or \.jsonl"):
        TextSource(tmp_path / "x.csv")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(TextSourceError, match="holds no sentences"):
        TextSource(tmp_path / "empty.txt")


# ---- text shards ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_set(tmp_path_factory, corpus):
    d = tmp_path_factory.mktemp("text")
    texts = corpus[:100] + ["Ünïcödé sentence: 東京 and 🙂.", "Another one; with — dashes."]
    path = _jsonl(
        d / "data.jsonl", [json.dumps({"text": t, "label": i % 3}, ensure_ascii=False) for i, t in enumerate(texts)]
    )
    m = write_text_shards(
        path,
        d / "shards",
        val_fraction=0.1,
        test_fraction=0.1,
        samples_per_shard=12,
        min_shards=2,
        seed=3,
        tokenizer_vocab_size=500,
    )
    return d / "shards", m, texts


def test_text_shards_and_manifest(text_set):
    out, m, texts = text_set
    assert S.read_manifest(out) == m
    assert m["modality"] == "text" and m["tokenizer"] == TOKENIZER_FILE and m["labeled"] and m["num_classes"] == 3
    assert m["num_samples"] == len(texts) and m["num_corrupt"] == 0
    assert S.sha256_file(out / TOKENIZER_FILE) == m["tokenizer_sha256"]
    tok = load_tokenizer(out, m)
    assert tok.vocab_size == m["tokenizer_vocab_size"] <= 500
    seen = []
    for split in S.SPLITS:
        urls, counts = S.shard_urls(out, m, split)
        assert len(urls) >= 2 and sum(counts) == m["splits"][split]["num_samples"]
        for u, c in zip(urls, counts, strict=True):
            assert S.sha256_file(u) == next(s["sha256"] for s in m["splits"][split]["shards"] if u.endswith(s["name"]))
            assert sum(1 for _ in sample_pipeline([u], decode=decode_text)) == c
        got = list(sample_pipeline(urls, decode=decode_text))
        seen += [(t, y) for t, y, _ in got]
        ids, labels = load_text_split(urls, tok, 24)
        assert ids.shape == (len(got), 24) and ids.dtype == torch.long
        assert labels.tolist() == [y for _, y, _ in got]
        assert (ids[:, 0] == CLS).all()
    assert sorted(seen) == sorted((t, i % 3) for i, t in enumerate(texts))  # each sentence once, with its label
    # the tokenizer saw the train split only: retraining on it gives the same merges
    train_texts = [t for t, _, _ in sample_pipeline(S.shard_urls(out, m, "train")[0], decode=decode_text)]
    assert train_bpe(train_texts, 500) == tok


def test_writing_is_deterministic(tmp_path, text_set):
    out, m, _ = text_set
    again = write_text_shards(
        m["source"]["path"],
        tmp_path / "again",
        val_fraction=0.1,
        test_fraction=0.1,
        samples_per_shard=12,
        min_shards=2,
        seed=3,
        tokenizer_vocab_size=500,
    )
    assert again["splits"] == m["splits"] and again["tokenizer_sha256"] == m["tokenizer_sha256"]


def test_training_stream_gives_ids_and_every_sentence_each_epoch(text_set):
    out, m, _ = text_set
    urls, counts = S.shard_urls(out, m, "train")
    tok = load_tokenizer(out, m)
    tf = TextTransform(tok, 20)
    by_index = {}
    offset = 0
    for u, c in zip(urls, counts, strict=True):  # dense index = shard offset + position in the shard
        for pos, (t, _, _) in enumerate(sample_pipeline([u], decode=decode_text)):
            by_index[offset + pos] = t
        offset += c
    stream = ShardStream(
        urls,
        counts,
        transform=tf,
        decode=decode_text,
        batch_size=8,
        rank=0,
        world_size=1,
        loader_workers=2,
        shuffle_buffer=16,
        seed=0,
    )
    for epoch in range(2):
        stream.set_epoch(epoch)
        plan = stream.plan()
        seen: Counter[int] = Counter()
        n_batches = 0
        for views, _labels, index in training_loader(stream, num_workers=2):
            assert isinstance(views, list) and len(views) == 1
            ids = views[0]
            assert ids.shape == (8, 20) and ids.dtype == torch.long and (ids[:, 0] == CLS).all()
            for row, i in zip(ids, index.tolist(), strict=True):
                torch.testing.assert_close(row, tf.ids(by_index[i]))  # the index names the sentence
            seen.update(index.tolist())
            n_batches += 1
        assert n_batches == plan.steps
        assert set(seen) == set(range(sum(counts)))  # every training sentence at least once
        assert sum(seen.values()) - len(seen) == plan.samples_seen - plan.unique_samples  # only the planned repeats
    # the same through the convenience builder
    s2 = text_stream(out, m, batch_size=8, rank=0, world_size=1, loader_workers=0, max_len=20, shuffle_buffer=16)
    views, _, _ = next(iter(training_loader(s2, num_workers=0)))
    assert views[0].shape == (8, 20)


def test_pretrain_loop_runs_simcse_on_text_shards_and_embeds_a_split(text_set):
    out, m, _ = text_set
    tok = load_tokenizer(out, m)
    torch.manual_seed(0)
    method = SimCSE(vocab_size=tok.vocab_size, max_len=20, dim=16, depth=1, heads=2)
    stream = text_stream(out, m, batch_size=8, rank=0, world_size=1, loader_workers=0, max_len=20, shuffle_buffer=16)
    cfg = LoopConfig(
        epochs=1, batch_size_per_worker=8, optimizer="adamw", lr_base=1e-3, warmup_epochs=0, loader_workers=0
    )
    loop = TrainingLoop(method, method, stream, cfg, torch.device("cpu"))
    reports = []
    loop.run(lambda metrics, state: reports.append(metrics))
    assert len(reports) == 1 and reports[0]["step"] == loop.steps_per_epoch
    assert all(k in reports[0] for k in ("train/loss", "train/pos_acc", "train/neg_sim"))
    feats, labels = embed_text_split(method.encoder(), S.shard_urls(out, m, "val")[0], tok, max_len=20)
    assert feats.shape == (m["splits"]["val"]["num_samples"], 16) and labels.shape == (feats.shape[0],)
    assert torch.isfinite(feats).all()
