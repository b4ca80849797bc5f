"""The pipeline's Ray Train trainer: Ray's TorchTrainer less the Ray Data actor it does not use."""

from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

from pipelines.stages._train import Trainer


def _loop(config: dict) -> None:
    pass


def test_a_run_without_datasets_starts_no_dataset_manager():
    """Ray Train's DatasetsCallback starts a DatasetManager actor for every worker group,
    datasets or not; the pipeline's trainer leaves it out and keeps every other callback
    (the whole chain, the faults and the sweeps train through it)."""
    ours = Trainer(_loop, scaling_config=ScalingConfig(num_workers=2))
    rays = TorchTrainer(_loop, scaling_config=ScalingConfig(num_workers=2))
    assert isinstance(ours, TorchTrainer)
    kinds = [type(c) for c in ours._create_default_callbacks()]
    ray_kinds = [type(c) for c in rays._create_default_callbacks()]
    assert DatasetsCallback in ray_kinds and DatasetsCallback not in kinds
    assert kinds == [k for k in ray_kinds if k is not DatasetsCallback]
