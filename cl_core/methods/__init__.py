"""Self-supervised methods, one per module, registered by name (the file stem).

Every module of this package (other than ``base`` and names starting with ``_``) is
imported here, so a new method file registers itself without editing this one.
"""

import importlib
import pkgutil

from cl_core.methods.base import (
    METHODS,
    Method,
    StepOutput,
    build_method,
    get_method,
    known_methods,
    method_params,
    register,
)
from cl_core.methods.simclr import SimCLR

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "METHODS",
    "Method",
    "SimCLR",
    "StepOutput",
    "build_method",
    "get_method",
    "known_methods",
    "method_params",
    "register",
]
