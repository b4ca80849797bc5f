"""A byte-level BPE tokenizer, trained locally.

Byte-pair encoding [0] over UTF-8 bytes, as in GPT-2 [1]: the base vocabulary is the 256
byte values, so every string is encodable and ``decode(encode(s)) == s`` (no unknown
characters); merges learned from a corpus join frequent adjacent pairs. Text is first
split into pieces (a run of letters, of digits, of punctuation, each with the space
before it, or a run of whitespace), and merges never cross a piece boundary.

Token ids: ``[PAD]`` = 0, ``[CLS]`` = 1, ``[SEP]`` = 2, ``[UNK]`` = 3, then the 256 bytes
(id = 4 + byte value), then one id per merge in the order learned.

Training counts each distinct piece once with its frequency and keeps, for every
adjacent pair, its count and the pieces holding it; a merge rewrites only those pieces
and updates the counts around them (a heap with lazy deletion finds the next pair). The
most frequent pair is merged next; ties go to the pair with the smallest ids, so
training is deterministic and independent of the order of the sentences.

- [0] Sennrich, Haddow, Birch. Neural Machine Translation of Rare Words with Subword
  Units. ACL 2016. https://arxiv.org/abs/1508.07909
- [1] Radford et al. Language Models are Unsupervised Multitask Learners. 2019 (GPT-2,
  Sec. 2.2, byte-level BPE).
"""

from __future__ import annotations

import heapq
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

PAD, CLS, SEP, UNK = 0, 1, 2, 3
SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[UNK]")
BYTE_OFFSET = len(SPECIAL_TOKENS)  # id of byte 0
FIRST_MERGE = BYTE_OFFSET + 256  # id of the first learned merge
FORMAT = "clpipe-bpe/1"

# pieces: an English contraction, letters, digits, punctuation (each with one leading
# space), whitespace not followed by a non-space (so a space stays with the next
# word), other whitespace; the last alternative is a guard that never lets a
# character go unmatched
_PIECE = re.compile(r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+|[\s\S]""")
_CACHE_LIMIT = 200_000


def split_pieces(text: str) -> list[str]:
    """The pieces BPE works within; their concatenation is ``text``."""
    return _PIECE.findall(text)


def _merge_pair(ids: Sequence[int], a: int, b: int, new: int) -> list[int]:
    """Replace every non-overlapping (a, b) in ``ids``, left to right, by ``new``."""
    out: list[int] = []
    i, n = 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class Tokenizer:
    """Byte-level BPE with ``[CLS] ... [SEP]`` framing.

    Args:
        merges: the learned pairs in order; merge k makes token ``FIRST_MERGE + k``
            from two earlier tokens.
    """

    def __init__(self, merges: Sequence[tuple[int, int]]) -> None:
        self.merges: list[tuple[int, int]] = []
        self._bytes: list[bytes] = [b""] * BYTE_OFFSET + [bytes([i]) for i in range(256)]
        for k, (a, b) in enumerate(merges):
            new = FIRST_MERGE + k
            if not (BYTE_OFFSET <= a < new and BYTE_OFFSET <= b < new):
                raise ValueError(f"Tokenizer: merge {k} ({a}, {b}) must join two earlier non-special tokens")
            self.merges.append((int(a), int(b)))
            self._bytes.append(self._bytes[a] + self._bytes[b])
        self._ranks = {pair: k for k, pair in enumerate(self.merges)}
        self._cache: dict[str, tuple[int, ...]] = {}

    @property
    def vocab_size(self) -> int:
        return FIRST_MERGE + len(self.merges)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.merges == other.merges

    def __hash__(self) -> int:
        return hash(tuple(self.merges))

    def __getstate__(self) -> dict:  # pickled into DataLoader workers: leave the cache behind
        return {"merges": self.merges}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["merges"])  # type: ignore[misc]

    # ---- encoding ----------------------------------------------------------------
    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        hit = self._cache.get(piece)
        if hit is not None:
            return hit
        ids = [BYTE_OFFSET + c for c in piece.encode("utf-8")]
        ranks = self._ranks
        while len(ids) > 1:  # apply the earliest learned merge present, as training did
            best = min(zip(ids, ids[1:], strict=False), key=lambda p: ranks.get(p, len(ranks)))
            rank = ranks.get(best)
            if rank is None:
                break
            ids = _merge_pair(ids, best[0], best[1], FIRST_MERGE + rank)
        out = tuple(ids)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[piece] = out
        return out

    def tokens(self, text: str) -> list[int]:
        """The BPE ids of ``text`` without framing or truncation."""
        out: list[int] = []
        for piece in split_pieces(text):
            out.extend(self._encode_piece(piece))
        return out

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        """``[CLS] tokens [SEP]``; with ``max_len`` the tokens are cut so that the whole
        sequence has at most ``max_len`` ids (``[SEP]`` is always kept)."""
        if max_len is not None and max_len < 2:
            raise ValueError(f"Tokenizer.encode: max_len must be >= 2 (room for [CLS] and [SEP]), got {max_len}")
        ids = self.tokens(text)
        if max_len is not None:
            ids = ids[: max_len - 2]
        return [CLS, *ids, SEP]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; special tokens are skipped, and bytes that do not form
        valid UTF-8 (a sequence cut inside a character) become U+FFFD."""
        buf = bytearray()
        n = len(self._bytes)
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise ValueError(f"Tokenizer.decode: id {i} is outside the vocabulary (size {n})")
            buf += self._bytes[i]
        return buf.decode("utf-8", errors="replace")

    def token_bytes(self, i: int) -> bytes:
        return self._bytes[i]

    # ---- persistence -------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "special_tokens": list(SPECIAL_TOKENS),
            "byte_offset": BYTE_OFFSET,
            "vocab_size": self.vocab_size,
            "merges": [list(m) for m in self.merges],
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "tokenizer") -> Tokenizer:
        if d.get("format") != FORMAT:
            raise ValueError(f"{where}: not a {FORMAT} tokenizer (format {d.get('format')!r})")
        if list(d.get("special_tokens", [])) != list(SPECIAL_TOKENS) or d.get("byte_offset") != BYTE_OFFSET:
            raise ValueError(f"{where}: special tokens {d.get('special_tokens')} differ from {list(SPECIAL_TOKENS)}")
        tok = cls([(int(a), int(b)) for a, b in d["merges"]])
        if d.get("vocab_size", tok.vocab_size) != tok.vocab_size:
            raise ValueError(f"{where}: vocab_size {d['vocab_size']} does not match its {len(tok.merges)} merges")
        return tok

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer file")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(d, where=str(path))


def train_bpe(sentences: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Learn byte-level BPE merges from ``sentences``.

    Args:
        sentences: the training text.
        vocab_size: the largest vocabulary (special tokens + 256 bytes + merges), at
            least ``FIRST_MERGE`` (260, bytes only).
        min_frequency: a pair seen fewer times is never merged; training stops early
            when no pair is that frequent, so the vocabulary can end up smaller.
    """
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < FIRST_MERGE:
        raise ValueError(
            f"train_bpe: vocab_size must be an integer >= {FIRST_MERGE} (specials + 256 bytes), got {vocab_size!r}"
        )
    if not isinstance(min_frequency, int) or isinstance(min_frequency, bool) or min_frequency < 1:
        raise ValueError(f"train_bpe: min_frequency must be an integer >= 1, got {min_frequency!r}")
    counts: Counter[str] = Counter()
    for s in sentences:
        counts.update(split_pieces(s))
    words: list[list[int]] = []
    freqs: list[int] = []
    for piece, f in sorted(counts.items()):
        ids = [BYTE_OFFSET + c for c in piece.encode("utf-8")]
        if len(ids) > 1:  # single bytes hold no pair
            words.append(ids)
            freqs.append(f)

    pair_counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for wi, (w, f) in enumerate(zip(words, freqs, strict=True)):
        for p in zip(w, w[1:], strict=False):
            pair_counts[p] = pair_counts.get(p, 0) + f
            where.setdefault(p, set()).add(wi)
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    n_merges = vocab_size - FIRST_MERGE
    while len(merges) < n_merges and heap:
        neg, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -neg:
            continue  # stale entry: the pair's count changed and was pushed again
        if count < min_frequency:
            break
        new = FIRST_MERGE + len(merges)
        merges.append(pair)
        changed: set[tuple[int, int]] = set()
        for wi in where.pop(pair, ()):
            w = words[wi]
            nw = _merge_pair(w, pair[0], pair[1], new)
            if len(nw) == len(w):
                continue  # the pair left this piece in an earlier merge
            f = freqs[wi]
            for p in zip(w, w[1:], strict=False):
                pair_counts[p] -= f
                changed.add(p)
            for p in zip(nw, nw[1:], strict=False):
                pair_counts[p] = pair_counts.get(p, 0) + f
                where.setdefault(p, set()).add(wi)
                changed.add(p)
            words[wi] = nw
        for p in changed:
            c = pair_counts[p]
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                del pair_counts[p]
                where.pop(p, None)
    return Tokenizer(merges)
