"""A small Transformer sentence encoder over token ids, and SimCSE's [CLS] MLP pooler.

The encoder is BERT-like [0] in what it outputs (the final hidden state of the leading
``[CLS]`` token) and pre-norm [1] inside: token embedding + learned absolute position
embedding, dropout, ``depth`` pre-norm blocks of ``torch.nn.TransformerEncoderLayer``
(multi-head self-attention and a GELU MLP of width ``mlp_ratio * dim``, dropout p on the
attention weights, after attention and in the MLP), a final LayerNorm. Padding
(``[PAD]`` = 0) is masked out of attention. The dropout is what SimCSE [2] uses as its
data augmentation (p = 0.1, BERT's default).

- [0] Devlin et al. BERT: Pre-training of Deep Bidirectional Transformers for Language
  Understanding. NAACL 2019. https://arxiv.org/abs/1810.04805
- [1] Xiong et al. On Layer Normalization in the Transformer Architecture. ICML 2020.
  https://arxiv.org/abs/2002.04745
- [2] Gao, Yao, Chen. SimCSE: Simple Contrastive Learning of Sentence Embeddings. EMNLP
  2021. https://arxiv.org/abs/2104.08821
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from cl_core.text.tokenizer import PAD


class TextTransformer(nn.Module):
    """Token ids (N, L) padded with 0, ``[CLS]`` first -> the ``[CLS]`` vector (N, dim).

    Args:
        vocab_size: number of token ids (the tokenizer's ``vocab_size``).
        dim: hidden width.
        depth: number of Transformer blocks.
        heads: attention heads (must divide ``dim``).
        max_len: the longest sequence (size of the position table).
        dropout: dropout probability everywhere (embeddings, attention weights, block
            outputs, MLP).
        mlp_ratio: MLP width / dim.
    """

    def __init__(
        self,
        vocab_size: int = 30522,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        max_len: int = 32,
        dropout: float = 0.1,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        for k, v in {"vocab_size": vocab_size, "dim": dim, "depth": depth, "heads": heads, "max_len": max_len}.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TextTransformer: {k} must be an integer >= 1, got {v!r}")
        if dim % heads:
            raise ValueError(f"TextTransformer: heads ({heads}) must divide dim ({dim})")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
            raise ValueError(f"TextTransformer: dropout must be in [0, 1), got {dropout!r}")
        self.vocab_size, self.dim, self.max_len = vocab_size, dim, max_len
        self.tok_embed = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, dim))
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            dim, heads, int(round(mlp_ratio * dim)), dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        nn.init.normal_(self.tok_embed.weight, std=0.02)  # BERT's initializer range
        with torch.no_grad():
            self.tok_embed.weight[PAD].zero_()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2:
            raise ValueError(f"TextTransformer: expected token ids (N, L), got shape {tuple(ids.shape)}")
        length = ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"TextTransformer: sequence length {length} exceeds max_len {self.max_len}")
        x = self.drop(self.tok_embed(ids) + self.pos_embed[:, :length])  # (N, L, dim)
        x = self.blocks(x, src_key_padding_mask=ids == PAD)
        return x[:, 0]  # the [CLS] position


class MLPPooler(nn.Sequential):
    """SimCSE's pooler over [CLS]: Linear(dim, dim) then tanh (BERT's pooler form)."""

    def __init__(self, dim: int) -> None:
        super().__init__(nn.Linear(dim, dim), nn.Tanh())


TEXT_ENCODERS: dict[str, type[nn.Module]] = {"text_transformer": TextTransformer}


def build_text_encoder(name: str, **kwargs: object) -> tuple[nn.Module, int]:
    """Build a text encoder by name (``text_transformer``); returns (module, output dim).
    Keyword arguments the encoder does not take are ignored, as for image backbones."""
    if name not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder {name!r}; known: {', '.join(sorted(TEXT_ENCODERS))}")
    cls = TEXT_ENCODERS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    model = cls(**{k: v for k, v in kwargs.items() if k in accepted})
    return model, int(model.dim)  # type: ignore[arg-type]
