import numpy as np
import pytest
import torch
from PIL import Image

from cl_core.augment import EvalTransform, SimCLRTransform


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))


@pytest.mark.parametrize("blur", [0.0, 0.5])
def test_two_views_shapes_and_dtype(image, blur):
    views = SimCLRTransform(16, blur_prob=blur)(image)
    assert len(views) == 2
    for v in views:
        assert v.shape == (3, 16, 16) and v.dtype == torch.float32
    assert not torch.equal(views[0], views[1])


def test_grayscale_input_becomes_rgb_in_reader_not_transform():
    gray = Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).convert("RGB")
    assert SimCLRTransform(8)(gray)[0].shape == (3, 8, 8)


def test_deterministic_under_a_seed(image):
    t = SimCLRTransform(16, blur_prob=0.5)
    torch.manual_seed(3)
    a = t(image)
    torch.manual_seed(3)
    b = t(image)
    torch.manual_seed(4)
    c = t(image)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_n_views_and_eval_transform(image):
    assert len(SimCLRTransform(8, n_views=4)(image)) == 4
    e = EvalTransform(12)
    assert e(image).shape == (3, 12, 12)
    assert torch.equal(e(image), e(image))
