"""cl_core: the science of contrastive self-supervised learning in plain PyTorch.

Nothing in this package imports Ray, MLflow, an object store's SDK (boto3, pyarrow) or
the packages above it (``make lint`` checks it: import-linter's contracts in
``pyproject.toml``). A remote location (``s3://``) is read and written through the
storage backend the layer above provides (``cl_core.data.storage``; ``s3`` is
``infra.s3``, found by its entry point). Every piece can be
used and tested in one Python process. The pipeline (``pipelines``) wires it to Ray and
MLflow; logged models' MLflow side is ``pipelines.models``.
"""

__version__ = "0.1.0"
