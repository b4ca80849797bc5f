"""Projection heads."""

from __future__ import annotations

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
        num_layers: 2 (SimCLR) or 3 (SimCLRv2); 2-4 accepted.
    """

    def __init__(self, input_dim: int, hidden_dim: int = 2048, output_dim: int = 128, num_layers: int = 2) -> None:
        super().__init__()
        if not 2 <= num_layers <= 4:
            raise ValueError(f"SimCLRProjectionHead: num_layers must be 2, 3 or 4, got {num_layers}")
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
        self.output_dim = output_dim

    def forward(self, h, upto: int | None = None):
        """Project h; ``upto=k`` returns the output of the first k layers (SimCLRv2 fine-tuning)."""
        for layer in self.layers[: self.num_layers if upto is None else upto]:
            h = layer(h)
        return h
