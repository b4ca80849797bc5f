"""Unsupervised SimCSE: dropout as the augmentation of a sentence [0].

Each sentence of the batch goes through the encoder twice; the two embeddings differ
only by the encoder's dropout masks and form the positive pair, and the other
sentences' second embeddings are the negatives (Eq. 1 of [0], see
:class:`cl_core.losses.simcse.SimCSELoss`). Training pools the [CLS] state through an
MLP; evaluation uses the [CLS] state without it (the pooling ablation of [0]).

- [0] Gao, Yao, Chen. SimCSE: Simple Contrastive Learning of Sentence Embeddings. EMNLP
  2021. https://arxiv.org/abs/2104.08821
- [1] Devlin et al. BERT: Pre-training of Deep Bidirectional Transformers for Language
  Understanding. NAACL 2019. https://arxiv.org/abs/1810.04805
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cl_core.errors import HyperparameterError
from cl_core.losses.simcse import SimCSELoss
from cl_core.methods.base import (
    Method,
    StepOutput,
    check_int,
    check_momentum,
    check_positive,
    register,
)
from cl_core.text.encoder import TEXT_ENCODERS, MLPPooler, build_text_encoder
from cl_core.text.tokenizer import BYTE_OFFSET, CLS, PAD, SEP

POOLERS = ("cls_mlp_train", "cls_mlp", "cls")


@register("simcse")
class SimCSE(Method):
    """A Transformer text encoder trained with SimCSE's dropout-noise InfoNCE.

    ``forward(views)`` takes ``views = [ids]``, token ids (N, L) starting with
    ``[CLS]`` and padded with ``[PAD]`` = 0 (:class:`cl_core.data.text.TextTransform`).

    Args:
        backbone: a text encoder name (:data:`cl_core.text.encoder.TEXT_ENCODERS`:
            ``text_transformer``); ``backbone_args`` may carry its sizes, which take
            precedence over the size arguments below (other keys are ignored).
        gather_distributed: negatives from all workers.
        temperature: T of Eq. 1.
        vocab_size: token ids of the tokenizer (its ``vocab_size``).
        max_len: the longest token sequence, [CLS] and [SEP] included.
        dim, depth, heads: encoder width, blocks and attention heads.
        dropout: the encoder's dropout, SimCSE's only augmentation.
        pooler: ``cls_mlp_train`` (MLP over [CLS] in training, plain [CLS] for
            evaluation: unsupervised SimCSE), ``cls_mlp`` (MLP in both: supervised
            SimCSE), ``cls`` (no MLP).
    """

    # the sweep's default space (sweep.space unset): SimCSE's temperature study (its Table D.1): 0.05 best
    sweep_space: ClassVar[dict[str, list[Any]]] = {"temperature": [0.01, 0.05, 0.1]}

    view_kind = "text"

    def __init__(
        self,
        backbone: str = "text_transformer",
        *,
        backbone_args: dict | None = None,
        gather_distributed: bool = True,
        temperature: float = 0.05,  # SimCSE [0] training details (App. A) and released scripts: tau = 0.05
        vocab_size: int = 30522,  # BERT [1] uncased WordPiece vocabulary, the tokenizer SimCSE [0] uses
        max_len: int = 32,  # SimCSE [0] training details and released scripts: max sequence length 32
        dim: int = 768,  # SimCSE [0] Sec. 3: BERT-base [1], hidden size 768
        depth: int = 12,  # BERT-base [1]: 12 layers
        heads: int = 12,  # BERT-base [1]: 12 attention heads
        dropout: float = 0.1,  # SimCSE [0] Sec. 3 dropout ablation: p = 0.1 (BERT's default) is best
        pooler: str = "cls_mlp_train",  # SimCSE [0] pooling ablation: unsupervised, MLP over [CLS] in training only
    ) -> None:
        super().__init__()
        if backbone not in TEXT_ENCODERS:
            raise ValueError(
                f"simcse: backbone must be a text encoder ({', '.join(sorted(TEXT_ENCODERS))}), got "
                f"{backbone!r}; SimCSE encodes token ids, not images"
            )
        if pooler not in POOLERS:
            raise HyperparameterError("pooler", f"must be one of {', '.join(POOLERS)}, got {pooler!r}")
        sizes: dict[str, Any] = {
            "vocab_size": check_int("vocab_size", vocab_size, BYTE_OFFSET + 1),
            "max_len": check_int("max_len", max_len, 2),
            "dim": check_int("dim", dim),
            "depth": check_int("depth", depth),
            "heads": check_int("heads", heads),
            "dropout": check_momentum("dropout", dropout),
        }
        sizes.update({k: v for k, v in (backbone_args or {}).items() if k in sizes})
        if sizes["dim"] % sizes["heads"]:
            raise HyperparameterError("heads", f"must divide dim, got heads={sizes['heads']} and dim={sizes['dim']}")
        self.backbone, self.feat_dim = build_text_encoder(backbone, **{**(backbone_args or {}), **sizes})
        self.max_len, self.vocab_size, self.pooler = sizes["max_len"], sizes["vocab_size"], pooler
        if pooler != "cls":  # built only when used, so that every parameter gets a gradient (DDP)
            self.mlp = MLPPooler(self.feat_dim)
        self.criterion = SimCSELoss(check_positive("temperature", temperature), gather_distributed=gather_distributed)

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        if len(views) != 1:
            raise ValueError(f"simcse: expected views = [token ids (N, L)], got {len(views)} views")
        ids = views[0]
        n = ids.shape[0]
        # both passes in one call on the duplicated batch: each copy draws its own dropout
        # masks, as running the encoder twice would (and as SimCSE's code does)
        h = self.backbone(torch.cat([ids, ids]))  # (2N, dim)
        z = self.mlp(h) if self.pooler != "cls" else h
        logits, target = self.criterion.logits(z[:n], z[n:])
        loss = F.cross_entropy(logits, target)
        with torch.no_grad():
            sims = logits * self.criterion.temperature  # cosines
            pos = sims.gather(1, target[:, None]).squeeze(1)
            neg_mask = torch.ones_like(sims, dtype=torch.bool).scatter_(1, target[:, None], False)
            metrics = {
                "train/loss": loss.detach(),
                "train/pos_acc": (logits.argmax(1) == target).float().mean(),
                "train/pos_sim": pos.mean(),
                "train/neg_sim": sims[neg_mask].mean() if neg_mask.any() else sims.new_zeros(()),
                "train/emb_std": F.normalize(z[:n].float(), dim=1).std(0).mean() if n > 1 else sims.new_zeros(()),
            }
        return StepOutput(loss=loss, metrics=metrics)

    def encoder(self) -> nn.Module:
        """Token ids (N, L) -> (N, dim): the [CLS] state, through the MLP only for
        ``pooler="cls_mlp"``. Call ``.eval()`` for embeddings without dropout."""
        if self.pooler == "cls_mlp":
            return nn.Sequential(self.backbone, self.mlp)
        return self.backbone

    @classmethod
    def smoke_kwargs(cls) -> dict[str, Any]:
        return {"backbone": "text_transformer", "vocab_size": 64, "max_len": 16, "dim": 16, "depth": 1, "heads": 2}

    @classmethod
    def example_batch(
        cls, n: int = 4, image_size: int = 16, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """Random token ids (N, L), L = min(image_size, smoke max_len): [CLS], random
        tokens, [SEP], then [PAD] up to L (lengths vary from 3 to L)."""
        kw = cls.smoke_kwargs()
        length = max(3, min(image_size, kw["max_len"]))
        ids = torch.randint(BYTE_OFFSET, kw["vocab_size"], (n, length), generator=generator)
        lengths = torch.randint(3, length + 1, (n,), generator=generator)
        pos = torch.arange(length)[None, :]
        ids = ids.masked_fill(pos >= lengths[:, None], PAD)
        ids[:, 0] = CLS
        ids[torch.arange(n), lengths - 1] = SEP
        return {"views": [ids]}
