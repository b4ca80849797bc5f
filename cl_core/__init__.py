"""cl_core: the science of contrastive self-supervised learning in plain PyTorch.

Nothing in this package imports Ray, MLflow or boto3: every piece can be used and
tested in one Python process. The pipeline (``pipelines``) wires it to Ray and MLflow.
"""

__version__ = "0.1.0"
