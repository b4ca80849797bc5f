"""Text pieces: a byte-level BPE tokenizer, a small Transformer sentence encoder and a
corpus of sentences that ships with Python."""

from cl_core.text.corpus import python_docs_sentences, write_corpus
from cl_core.text.encoder import TEXT_ENCODERS, TextTransformer, build_text_encoder
from cl_core.text.tokenizer import CLS, PAD, SEP, UNK, Tokenizer, train_bpe

__all__ = [
    "CLS",
    "PAD",
    "SEP",
    "TEXT_ENCODERS",
    "UNK",
    "TextTransformer",
    "Tokenizer",
    "build_text_encoder",
    "python_docs_sentences",
    "train_bpe",
    "write_corpus",
]
