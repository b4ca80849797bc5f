"""Self-supervised methods, one per module, registered by name (the file stem)."""

from cl_core.methods.base import METHODS, Method, StepOutput, get_method, known_methods, register
from cl_core.methods.simclr import SimCLR

__all__ = ["METHODS", "Method", "SimCLR", "StepOutput", "get_method", "known_methods", "register"]
