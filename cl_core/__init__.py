"""cl_core: the science of contrastive self-supervised learning in plain PyTorch.

Nothing in this package imports Ray, MLflow or the packages above it (``make lint``
checks it: import-linter's contracts in ``pyproject.toml``); boto3 only in
``cl_core/data/storage.py``, on first use of an ``s3://`` location. Every piece can be
used and tested in one Python process. The pipeline (``pipelines``) wires it to Ray and
MLflow; logged models' MLflow side is ``pipelines.models``.
"""

__version__ = "0.1.0"
