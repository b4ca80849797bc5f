"""Contrastive losses, one per module."""

from cl_core.losses.nt_xent import NTXentLoss

__all__ = ["NTXentLoss"]
