"""A corpus that ships with Python: the help texts of ``pydoc_data.topics``, as sentences.

``pydoc_data.topics.topics`` maps each help topic ("assert", "for", "typesseq", ...) to
the plain-text rendering of a section of the language reference. Prose paragraphs start
at the left margin; code samples, grammar rules and tables are indented, and headings
are underlined. The prose is split into sentences, which make a small English corpus
(over a thousand sentences) for tests and demos without any download. The exact text
follows the Python version's documentation.
"""

from __future__ import annotations

import re
from pathlib import Path

_UNDERLINE = re.compile(r"^\s*([*=\-~^#+])\1{2,}\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_MIN_WORDS, _MAX_WORDS = 5, 50


def _prose_paragraphs(text: str) -> list[str]:
    """Paragraphs (blank-line separated) that start at the margin, minus headings,
    each joined onto one line with single spaces."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.split("\n") if ln.strip()]
        if not lines or lines[0][:1].isspace():
            continue  # code, grammar, tables and notes are indented
        if any(_UNDERLINE.match(ln) for ln in lines):
            continue  # a heading
        out.append(" ".join(" ".join(lines).split()))
    return out


def _is_sentence(s: str) -> bool:
    words = s.split()
    if not _MIN_WORDS <= len(words) <= _MAX_WORDS or s[-1] not in ".!?":
        return False
    if not (s[0].isupper() or s[0] in "\"'("):
        return False
    letters = sum(c.isalpha() or c == " " for c in s)
    return letters >= 0.75 * len(s)  # mostly words, not code


def python_docs_sentences(limit: int | None = None) -> list[str]:
    """Sentences of the Python help topics, in topic-name order, deduplicated (first
    occurrence kept); the first ``limit`` of them when given."""
    from pydoc_data.topics import topics

    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"python_docs_sentences: limit must be a non-negative integer or None, got {limit!r}")
    seen: set[str] = set()
    out: list[str] = []
    for name in sorted(topics):
        for para in _prose_paragraphs(topics[name]):
            for s in _SENTENCE_END.split(para):
                s = s.strip()
                if s and s not in seen and _is_sentence(s):
                    seen.add(s)
                    out.append(s)
                    if limit is not None and len(out) >= limit:
                        return out
    return out


def write_corpus(path: str | Path, limit: int | None = None) -> int:
    """Write :func:`python_docs_sentences` to ``path`` as UTF-8, one sentence a line;
    returns the number of sentences."""
    sentences = python_docs_sentences(limit)
    Path(path).write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
    return len(sentences)
