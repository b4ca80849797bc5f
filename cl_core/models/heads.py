"""Projection heads."""

from __future__ import annotations

import torch
from torch import nn


class SimCLRProjectionHead(nn.Module):
    """SimCLR's MLP projection head g(.) [0], deepened in SimCLRv2 [1].

    "We use a MLP with one hidden layer to obtain z_i = g(h_i) = W(2) sigma(W(1) h_i)" [0];
    SimCLRv2 uses a 3-layer head and fine-tunes from its first layer [1]. As in SimCLRv2's
    code, every layer is a bias-free Linear followed by BatchNorm1d; hidden layers add a
    ReLU, and the output layer's batch norm has no shift (its beta is a frozen zero,
    TensorFlow's ``center=False``). The hidden layers keep the input width by default.

    - [0] Chen et al., 2020, https://arxiv.org/abs/2002.05709
    - [1] Chen et al., Big Self-Supervised Models are Strong Semi-Supervised Learners,
      2020, https://arxiv.org/abs/2006.10029

    Args:
        input_dim: feature dim of the backbone.
        hidden_dim: width of the hidden layers (SimCLR: the input width).
        output_dim: dim of z (SimCLR: 128).
        num_layers: 2 (SimCLR) or 3 (SimCLRv2); 2-4 accepted, and the SimCLR paper's
            ablations (its Figure 8): 1, a linear projection (a Linear and its batch
            norm, the TF code's ``head_proj_mode: linear``), and 0, no head (z = h).
    """

    def __init__(self, input_dim: int, hidden_dim: int = 2048, output_dim: int = 128, num_layers: int = 2) -> None:
        super().__init__()
        if not 0 <= num_layers <= 4:
            raise ValueError(f"SimCLRProjectionHead: num_layers must be 0 to 4, got {num_layers}")
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList()
        for i in range(num_layers):
            last = i == num_layers - 1
            block: list[nn.Module] = [nn.Linear(dims[i], dims[i + 1], bias=False), nn.BatchNorm1d(dims[i + 1])]
            if last:
                block[1].bias.requires_grad_(False)  # scale only: no learned shift on z
            else:
                block.append(nn.ReLU(inplace=True))
            self.layers.append(nn.Sequential(*block))
        self.num_layers = num_layers
        self.output_dim = output_dim if num_layers else input_dim

    def forward(self, h: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """Project h; ``upto=k`` returns the output of the first k layers (SimCLRv2 fine-tuning)."""
        for layer in self.layers[: self.num_layers if upto is None else upto]:
            h = layer(h)
        return h


class MLP(nn.Sequential):
    """A plain MLP over ``dims`` (input, hidden..., output): Linear [-> BatchNorm1d] ->
    activation on every hidden layer; the output layer is a Linear, optionally followed
    by a BatchNorm1d (``last_norm``, with or without affine parameters).

    The heads of the literature are instances: MoCo v2 ``MLP([F, F, 128], norm=False)``;
    BYOL ``MLP([F, 4096, 256])``; SimSiam's projector ``MLP([F, 2048, 2048, 2048],
    last_norm=True)``; MoCo v3's ``MLP([F, 4096, 256], last_norm=True,
    last_norm_affine=False)``; Barlow Twins ``MLP([F, 8192, 8192, 8192])``; DINO's
    ``MLP([F, 2048, 2048, 256], norm=False, activation="gelu")``.

    Args:
        dims: layer widths, at least two.
        norm: BatchNorm1d after each hidden Linear (Linear biases are then dropped,
            as the norm's shift replaces them).
        activation: ``relu`` or ``gelu``.
        last_norm: BatchNorm1d after the output Linear.
        last_norm_affine: learnable scale and shift of that last norm.
    """

    def __init__(
        self,
        dims: list[int],
        *,
        norm: bool = True,
        activation: str = "relu",
        last_norm: bool = False,
        last_norm_affine: bool = True,
    ) -> None:
        if len(dims) < 2:
            raise ValueError(f"MLP: needs at least input and output widths, got {dims}")
        acts = {"relu": nn.ReLU, "gelu": nn.GELU}
        if activation not in acts:
            raise ValueError(f"MLP: activation must be one of {sorted(acts)}, got {activation!r}")
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            last = i == len(dims) - 2
            with_norm = last_norm if last else norm
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=not with_norm))
            if with_norm:
                layers.append(nn.BatchNorm1d(dims[i + 1], affine=last_norm_affine if last else True))
            if not last:
                layers.append(acts[activation]())
        super().__init__(*layers)
        self.output_dim = dims[-1]
