"""The loader module that models logged before :mod:`cl_core.downstream` existed name in
their ``MLmodel`` (``loader_module: cl_core.models.saved``): it is
:mod:`cl_core.downstream.saved`, where new models point."""

from cl_core.downstream.saved import *  # noqa: F403
from cl_core.downstream.saved import _load_pyfunc  # noqa: F401  (MLflow's entry point)
