"""Text data: a sentence source, text shards with their tokenizer, and the reading side.

Source (:class:`TextSource`): a ``.txt`` file, one sentence a line, or a ``.jsonl`` file,
one JSON object a line with a ``"text"`` string and an optional non-negative integer
``"label"`` (if any line has a label, every line needs one). Blank lines are skipped.
A bad line (not UTF-8, invalid JSON, not an object, missing or empty text, bad label)
gets a one-line message naming the file and the line. Policy: when at most
``max_bad_fraction`` (default 1%) of the non-blank lines are bad they are skipped,
counted and listed in the manifest (``num_corrupt``, ``corrupt``: ``{"id":
"FILE:LINE", "error": ...}``); more than that, and reading fails with the first bad
line's message, since a file that broken is more likely the wrong file or format.

Shards (:func:`write_text_shards`): the same layout and manifest as the image shards
(:mod:`cl_core.data.shards`): ``{split}-NNNNNN.tar`` holding ``KEY.txt`` (UTF-8),
``KEY.cls`` when labeled and ``KEY.json`` (``{"id", "index"}``), a byte-level BPE
``tokenizer.json`` trained on the train split only, and ``manifest.json`` written last
with ``"modality": "text"``, ``"tokenizer": "tokenizer.json"`` and
``"tokenizer_vocab_size"`` added.

Reading: :func:`decode_text` for :class:`~cl_core.data.reader.ShardStream`'s
``decode`` and :class:`TextTransform` as its ``transform`` give batches
``views = [ids (N, max_len)]``; :func:`text_stream` builds that stream from a shard set;
:func:`load_text_split` / :func:`embed_text_split` give a whole split for evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cl_core.data import shards as S
from cl_core.data.reader import ShardStream, sample_pipeline
from cl_core.data.sources import SampleRef, Source, SourceError
from cl_core.text.tokenizer import PAD, Tokenizer, train_bpe

TOKENIZER_FILE = "tokenizer.json"
TEXT_EXTS = (".txt", ".jsonl")


class TextSourceError(SourceError):
    """A text source cannot be used (missing file, unknown format, too many bad lines)."""


class TextSource(Source):
    """Sentences (and labels) of a ``.txt`` or ``.jsonl`` file, read at construction.

    Attributes:
        texts, labels, lines: per kept sentence: the text, the label (-1 unlabeled),
            the 1-based line number in the file.
        bad: the skipped lines: ``{"line": n, "error": "FILE:n: why"}``.
    """

    kind = "text"

    def __init__(self, path: str | Path, *, max_bad_fraction: float = 0.01) -> None:
        self.path = Path(path)
        if not isinstance(max_bad_fraction, (int, float)) or not 0 <= max_bad_fraction < 1:
            raise TextSourceError(f"max_bad_fraction must be in [0, 1), got {max_bad_fraction!r}")
        self.max_bad_fraction = float(max_bad_fraction)
        suffix = self.path.suffix.lower()
        if suffix not in TEXT_EXTS:
            raise TextSourceError(
                f"data.source.path: {self.path} must be a .txt (one sentence a line) or .jsonl "
                f'(one {{"text": ..., "label": ...}} object a line) file'
            )
        if not self.path.is_file():
            raise TextSourceError(f"data.source.path: {self.path} does not exist; give an existing {suffix} file")
        self.texts: list[str] = []
        self.labels: list[int] = []
        self.lines: list[int] = []
        self.bad: list[dict] = []
        unlabeled: list[int] = []  # positions in texts of .jsonl records without a label
        for lineno, raw in enumerate(self.path.read_bytes().split(b"\n"), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                self._bad(lineno, f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark
            if not line.strip():
                continue
            if suffix == ".txt":
                self._keep(line.strip(), -1, lineno)
                continue
            record = self._parse_json_line(line, lineno)
            if record is None:
                continue
            text, label = record
            if label < 0:
                unlabeled.append(len(self.texts))
            self._keep(text, label, lineno)
        if unlabeled and len(unlabeled) < len(self.texts):  # mixed: the unlabeled records are bad
            drop = set(unlabeled)
            for i in unlabeled:
                self._bad(self.lines[i], 'missing "label" (other lines of the file are labeled)')
            keep = [i for i in range(len(self.texts)) if i not in drop]
            self.texts = [self.texts[i] for i in keep]
            self.labels = [self.labels[i] for i in keep]
            self.lines = [self.lines[i] for i in keep]
            self.bad.sort(key=lambda b: b["line"])
        total = len(self.texts) + len(self.bad)
        if self.bad and len(self.bad) > self.max_bad_fraction * total:
            raise TextSourceError(
                f"{self.bad[0]['error']} ({len(self.bad)} bad of {total} non-blank lines; at most "
                f"{self.max_bad_fraction:.1%} are skipped)"
            )
        if not self.texts:
            raise TextSourceError(f"data.source.path: {self.path} holds no sentences")
        labeled = [lab for lab in self.labels if lab >= 0]
        self.class_names = [str(c) for c in range(max(labeled) + 1)] if labeled else []

    def _bad(self, lineno: int, why: str) -> None:
        self.bad.append({"line": lineno, "error": f"{self.path}:{lineno}: {why}"})

    def _keep(self, text: str, label: int, lineno: int) -> None:
        self.texts.append(text)
        self.labels.append(label)
        self.lines.append(lineno)

    def _parse_json_line(self, line: str, lineno: int) -> tuple[str, int] | None:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            self._bad(lineno, f"invalid JSON ({e.msg} at column {e.colno})")
            return None
        if not isinstance(obj, dict):
            self._bad(lineno, f'expected a JSON object with a "text" field, got {type(obj).__name__}')
            return None
        text = obj.get("text")
        if text is None:
            self._bad(lineno, 'missing "text" field')
            return None
        if not isinstance(text, str):
            self._bad(lineno, f'"text" must be a string, got {type(text).__name__}')
            return None
        if not text.strip():
            self._bad(lineno, '"text" is empty')
            return None
        label = obj.get("label")
        if label is None:
            return text, -1
        if not isinstance(label, int) or isinstance(label, bool) or label < 0:
            self._bad(lineno, f'"label" must be a non-negative integer, got {json.dumps(label)}')
            return None
        return text, label

    def __len__(self) -> int:
        return len(self.texts)

    def refs(self) -> list[SampleRef]:
        return [
            SampleRef(i, f"{self.path.name}:{ln}", lab)
            for i, (ln, lab) in enumerate(zip(self.lines, self.labels, strict=True))
        ]

    def encode(self, ref: SampleRef) -> tuple[bytes, str]:
        return self.texts[ref.index].encode("utf-8"), "txt"

    def describe(self) -> dict:
        return {"kind": "text", "path": str(self.path.resolve()), "max_bad_fraction": self.max_bad_fraction}

    def corrupt_entries(self) -> list[dict]:
        """The skipped lines in the manifest's ``corrupt`` format."""
        return [{"id": f"{self.path.name}:{b['line']}", "error": b["error"]} for b in self.bad]


def open_text_source(spec: dict) -> TextSource:
    """Rebuild a source from ``{"kind": "text", "path": ..., "max_bad_fraction": ...}``."""
    if spec.get("kind") != "text":
        raise TextSourceError(f"data.source.kind: expected 'text', got {spec.get('kind')!r}")
    return TextSource(spec["path"], max_bad_fraction=spec.get("max_bad_fraction", 0.01))


def write_text_shards(
    source: str | Path | TextSource,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    samples_per_shard: int = 256,
    min_shards: int = 4,
    seed: int = 0,
    tokenizer_vocab_size: int = 8192,
    tokenizer_min_frequency: int = 2,
    config: dict | None = None,
) -> dict:
    """Split ``source`` (a path or a :class:`TextSource`) into train/val/test
    (stratified when labeled), write the tar shards, train the tokenizer on the train
    split, write ``tokenizer.json`` and finally ``manifest.json``; returns the manifest.

    ``out_dir`` is created if needed; a manifest already there is removed first, so an
    interrupted rewrite never looks complete. ``config`` is recorded in the manifest.
    """
    src = source if isinstance(source, TextSource) else TextSource(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / S.MANIFEST).unlink(missing_ok=True)
    refs = src.refs()
    splits = S.split_refs(
        refs, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, stratified=src.labeled
    )
    if not splits["train"]:
        raise TextSourceError("data: the train split is empty; lower data.val_fraction / data.test_fraction")
    results: dict[str, list[dict]] = {}
    for split, items in splits.items():
        results[split] = [
            S.write_shard(src, items[a:b], out / f"{split}-{i:06d}.tar")
            for i, (a, b) in enumerate(S.plan_shards(len(items), samples_per_shard, min_shards))
        ]
    tokenizer = train_bpe([src.texts[r.index] for r in splits["train"]], tokenizer_vocab_size, tokenizer_min_frequency)
    tokenizer.save(out / TOKENIZER_FILE)
    settings = {
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "samples_per_shard": samples_per_shard,
        "min_shards": min_shards,
        "tokenizer_vocab_size": tokenizer_vocab_size,
        "tokenizer_min_frequency": tokenizer_min_frequency,
    }
    manifest = S.build_manifest(
        source=src,
        split_sizes={k: len(v) for k, v in splits.items()},
        shard_results=results,
        seed=seed,
        config={**settings, **(config or {})},
    )
    corrupt = src.corrupt_entries()
    manifest.update(
        {
            "modality": "text",
            "num_source_samples": manifest["num_source_samples"] + len(corrupt),  # the bad lines were never refs
            "num_corrupt": len(corrupt),
            "corrupt": corrupt[: S.MAX_LISTED_CORRUPT],
            "tokenizer": TOKENIZER_FILE,
            "tokenizer_vocab_size": tokenizer.vocab_size,
            "tokenizer_sha256": S.sha256_file(out / TOKENIZER_FILE),
        }
    )
    S.write_manifest(out, manifest)
    return manifest


def is_text_manifest(manifest: dict) -> bool:
    return manifest.get("modality") == "text"


def load_tokenizer(shard_dir: str | Path, manifest: dict) -> Tokenizer:
    """The tokenizer of a text shard set (named by its manifest)."""
    if not is_text_manifest(manifest):
        raise ValueError(f"{shard_dir}: not a text shard set (manifest modality {manifest.get('modality', 'image')!r})")
    return Tokenizer.load(Path(shard_dir) / manifest["tokenizer"])


# ---- reading --------------------------------------------------------------------------


def decode_text(sample: dict) -> tuple[str, int, int]:
    """(text, label, index) of a text shard sample; label -1 without ``.cls``, index -1
    when the pipeline does not number samples (``ShardStream``'s ``decode``)."""
    data = sample.get("txt")
    if data is None:
        raise ValueError(
            f"{sample.get('__url__')}: sample {sample.get('__key__')} has no .txt "
            f"(found: {', '.join(k for k in sample if not k.startswith('__'))})"
        )
    return data.decode("utf-8"), int(sample["cls"]) if "cls" in sample else -1, int(sample.get("__index__", -1))


class TextTransform:
    """text -> ``[ids]``: the tokenizer's ``[CLS] ... [SEP]`` ids, truncated and padded
    with ``[PAD]`` to ``max_len`` (a LongTensor (max_len,)), as a one-element views list
    so that batching gives ``views = [ids (N, max_len)]``."""

    def __init__(self, tokenizer: Tokenizer, max_len: int = 32) -> None:
        if not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"TextTransform: max_len must be an integer >= 2, got {max_len!r}")
        self.tokenizer, self.max_len = tokenizer, max_len

    def ids(self, text: str) -> torch.Tensor:
        ids = self.tokenizer.encode(text, self.max_len)
        out = torch.full((self.max_len,), PAD, dtype=torch.long)
        out[: len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        return out

    def batch(self, texts: Sequence[str]) -> torch.Tensor:
        """Ids (N, max_len) of ``texts``."""
        if not texts:
            return torch.empty(0, self.max_len, dtype=torch.long)
        return torch.stack([self.ids(t) for t in texts])

    def __call__(self, text: str) -> list[torch.Tensor]:
        return [self.ids(text)]


def text_stream(
    shard_dir: str | Path,
    manifest: dict,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    loader_workers: int,
    max_len: int = 32,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    split: str = "train",
) -> ShardStream:
    """The training stream of a text shard set for one worker: batches of
    ``(views=[ids (N, max_len)], labels, index)`` through :func:`training_loader`."""
    urls, counts = S.shard_urls(shard_dir, manifest, split)
    return ShardStream(
        urls,
        counts,
        transform=TextTransform(load_tokenizer(shard_dir, manifest), max_len),
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        loader_workers=loader_workers,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        decode=decode_text,
    )


def load_text_split(urls: Sequence[str], tokenizer: Tokenizer, max_len: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample of ``urls`` in order: (ids (N, max_len), labels (N,))."""
    tf = TextTransform(tokenizer, max_len)
    ids, labels = [], []
    for text, label, _ in sample_pipeline(urls, decode=decode_text):
        ids.append(tf.ids(text))
        labels.append(label)
    if not ids:
        return torch.empty(0, max_len, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return torch.stack(ids), torch.as_tensor(np.asarray(labels), dtype=torch.long)


def embed_text_split(
    encoder: nn.Module,
    urls: Sequence[str],
    tokenizer: Tokenizer,
    *,
    max_len: int = 32,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings (N, feat_dim) on CPU, labels (N,)) of a split, with ``encoder`` in
    eval mode (no dropout): the input of kNN / linear-probe evaluation."""
    from cl_core.evaluate import extract_features

    ids, labels = load_text_split(urls, tokenizer, max_len)
    return extract_features(encoder, ids, batch_size=batch_size, device=device), labels
