"""CPC v2: Contrastive Predictive Coding on a grid of image patches [0, 1].

Each image is cut into a grid of overlapping patches (by default a quarter of the image
side every eighth of it, CPC's 64 px every 32 px on 256 px images: a 7 x 7 grid on
16 or 32 px images; the grid follows the image size at run time). Every patch is
encoded on its own by the backbone (global-pooled features z, dim F). A context network
reads the grid top to bottom (``masked_conv``: CPC v2's PixelCNN-style stack; ``gru``: a
GRU down each column), so that its output at row i depends only on rows <= i (the
current row included, as in CPC v2's pseudo-code, whose masked (2 x 1) convolution spans
the row above and the current one); a linear
map W_k per offset k predicts, from the context at row i, the embedding of the patch k
rows below in the same column. InfoNCE picks the true patch among all patches of the
(global) batch. With ``directions=2`` a second context network and set of W_k do the
same bottom-up (on the vertically flipped grid), as CPC v2 predicts in more than one
direction.

Choices that follow CPC v2's published pseudo-code [0, App. A]: targets are a learned
linear map of z to 64 dims, predictions are scaled by 0.1, the loss scores by dot
product without temperature, and only the offset k = 3 is predicted by default (rows 1
and 2 below overlap or touch the context's own patches, which makes them easy). Batch
norm in the patch encoder is replaced by layer norm (``patch_norm="layer"``): batch
statistics would tie the patches of an image together.

Not reproduced: CPC v2's patch-level augmentations (colour dropping, per-patch flips
and jitter); the data stream's image-level augmentation is applied instead.

- [0] Hénaff et al., Data-Efficient Image Recognition with Contrastive Predictive Coding,
  2019, https://arxiv.org/abs/1905.09272
- [1] van den Oord, Li, Vinyals. Representation Learning with Contrastive Predictive
  Coding, 2018, https://arxiv.org/abs/1807.03748 (its vision experiments)
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from cl_core.errors import HyperparameterError
from cl_core.losses.cpc_infonce import GridInfoNCE
from cl_core.methods.base import Method, StepOutput, check_int, check_positive, register
from cl_core.models import build_backbone
from cl_core.models.patches import (
    GRUContext,
    MaskedConvContext,
    PatchGridEncoder,
    batchnorm_to_layernorm,
    encode_patches,
)

CONTEXTS = ("masked_conv", "gru")
PATCH_NORMS = ("layer", "batch")


@register("cpc")
class CPC(Method):
    """Patch encoder, autoregressive context network(s), per-offset linear predictors,
    InfoNCE over all patches of the batch.

    Args:
        backbone: name for :func:`cl_core.models.build_backbone` (the patch encoder);
            ``backbone_args`` its keyword arguments.
        gather_distributed: negatives (patch embeddings) from all workers.
        patch_size, patch_stride: in pixels; None: a quarter of the image side and half
            the patch (50% overlap).
        context: ``masked_conv`` or ``gru``.
        context_layers: residual blocks of the masked-conv context network.
        context_dim: hidden width of the masked-conv blocks; hidden size of the GRU.
        min_offset, max_offset: the rows below that are predicted, k in
            [min_offset, max_offset]; max_offset must be smaller than the grid's rows.
        target_dim: dim of the target embeddings (a linear map of z); None: z itself.
        emb_scale: factor on the predictions (CPC v2's pseudo-code).
        directions: 1 (top-down) or 2 (also bottom-up).
        patch_norm: ``layer`` (replace the backbone's BatchNorm2d by layer norm) or
            ``batch`` (keep it).
    """

    # the sweep's default space (sweep.space unset): no temperature or EMA: the learning rate
    sweep_space: ClassVar[dict[str, list[Any]]] = {"lr_base": [0.05, 0.2, 1.0]}

    view_kind = "single"

    def __init__(
        self,
        backbone: str = "small_cnn",
        *,
        backbone_args: dict | None = None,
        gather_distributed: bool = True,
        patch_size: int | None = None,  # CPC v1 [1] vision: 64 px patches of 256 px images (1/4 of the side)
        patch_stride: int | None = None,  # CPC v1 [1] vision: every 32 px, half a patch
        context: str = "masked_conv",  # CPC v2 [0] App. A: PixelCNN-style masked convolutions
        context_layers: int = 5,  # CPC v2 [0] App. A: 5 residual blocks
        context_dim: int = 256,  # CPC v2 [0] App. A: 256 channels
        min_offset: int = 3,  # CPC v2 [0] App. A: steps_to_ignore = 2, so the first offset is 3
        max_offset: int = 3,  # CPC v2 [0] App. A: steps_to_predict = 3 (CPC v1 [1]: up to 5 rows)
        target_dim: int | None = 64,  # CPC v2 [0] App. A: target_dim = 64 (1x1 conv of z)
        emb_scale: float = 0.1,  # CPC v2 [0] App. A: emb_scale = 0.1
        directions: int = 2,  # CPC v2 [0] "prediction lengths and directions"; CPC v1 [1]: 1
        patch_norm: str = "layer",  # CPC v2 [0]: layer norm instead of batch norm
    ) -> None:
        super().__init__()
        if context not in CONTEXTS:
            raise HyperparameterError("context", f"must be one of {', '.join(CONTEXTS)}, got {context!r}")
        if patch_norm not in PATCH_NORMS:
            raise HyperparameterError("patch_norm", f"must be one of {', '.join(PATCH_NORMS)}, got {patch_norm!r}")
        self.patch_size = None if patch_size is None else check_int("patch_size", patch_size)
        self.patch_stride = None if patch_stride is None else check_int("patch_stride", patch_stride)
        check_int("context_layers", context_layers)
        check_int("context_dim", context_dim)
        self.min_offset = check_int("min_offset", min_offset)
        self.max_offset = check_int("max_offset", max_offset)
        if max_offset < min_offset:
            raise HyperparameterError("max_offset", f"must be >= min_offset ({min_offset}), got {max_offset}")
        if target_dim is not None:
            check_int("target_dim", target_dim)
        self.emb_scale = check_positive("emb_scale", emb_scale)
        if directions not in (1, 2):
            raise HyperparameterError(
                "directions", f"must be 1 (top-down) or 2 (top-down and bottom-up), got {directions!r}"
            )
        self.context_kind = context

        self.backbone, self.feat_dim = build_backbone(backbone, **(backbone_args or {}))
        if patch_norm == "layer":
            batchnorm_to_layernorm(self.backbone)
        f = self.feat_dim
        self.target = nn.Linear(f, target_dim) if target_dim is not None else nn.Identity()
        d = target_dim if target_dim is not None else f
        self.offsets = list(range(min_offset, max_offset + 1))
        contexts: list[MaskedConvContext | GRUContext] = [
            MaskedConvContext(f, context_dim, context_layers)
            if context == "masked_conv"
            else GRUContext(f, context_dim)
            for _ in range(directions)
        ]
        self.contexts = nn.ModuleList(contexts)
        # predictors[d][t]: W_k of direction d for offset k = offsets[t]
        self.predictors = nn.ModuleList(
            nn.ModuleList(nn.Linear(ctx.out_dim, d) for _ in self.offsets) for ctx in contexts
        )
        self.criterion = GridInfoNCE(gather_distributed=gather_distributed)

    def encoder(self) -> nn.Module:
        return PatchGridEncoder(self.backbone, self.patch_size, self.patch_stride)

    def patch_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> z (N, R, Q, F)."""
        return encode_patches(self.backbone, x, self.patch_size, self.patch_stride)

    def context_grid(self, z: torch.Tensor, direction: int = 0) -> torch.Tensor:
        """Context of direction ``direction`` (0: top-down; 1: bottom-up, in flipped row
        order) for z (N, R, Q, F) -> (N, R, Q, C)."""
        zd = z if direction == 0 else z.flip(1)
        return self.contexts[direction](zd.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        (x,) = views
        z = self.patch_embeddings(x)  # (N, R, Q, F)
        rows = z.shape[1]
        if self.max_offset >= rows:
            raise ValueError(
                f"cpc: the patch grid of a {tuple(x.shape[-2:])} image has {rows} rows; max_offset "
                f"({self.max_offset}) must be smaller (lower it or use smaller patches/stride)"
            )
        t = self.target(z)  # (N, R, Q, D)
        losses, accs = [], []
        for d in range(len(self.contexts)):
            c = self.context_grid(z, d)
            td = t if d == 0 else t.flip(1)
            predictors = cast(nn.ModuleList, self.predictors[d])
            preds = {k: w(c[:, : rows - k]) * self.emb_scale for k, w in zip(self.offsets, predictors, strict=True)}
            loss_d, acc_d = self.criterion(preds, td)
            losses.append(loss_d)
            accs.append(acc_d)
        loss = torch.stack(losses).mean()
        z_std = F.normalize(z.detach().float().flatten(0, 2), dim=1).std(dim=0).mean()
        return StepOutput(
            loss=loss,
            metrics={"train/loss": loss.detach(), "train/acc": torch.stack(accs).mean(), "train/z_std": z_std},
        )

    @classmethod
    def smoke_kwargs(cls) -> dict:
        return {**super().smoke_kwargs(), "context_layers": 1, "context_dim": 8, "target_dim": 8}
