import torch

from cl_core.evaluate import knn_predict, knn_top1, linear_probe_top1, recalibrate_batch_norm


def _blobs(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centers = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    return centers[y] + torch.randn(n, 3, generator=g) * 0.5, y


def test_knn_and_probe_separate_blobs():
    xtr, ytr = _blobs(90, 0)
    xte, yte = _blobs(30, 1)
    assert knn_top1(xtr, ytr, xte, yte, k=5) == 1.0
    assert linear_probe_top1(xtr, ytr, xte, yte) == 1.0


def test_knn_weighted_vote_by_hand():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    q = torch.tensor([[1.0, 0.0]])
    # k=1: nearest is class 0; k=3: class 1 has two votes but lower similarities
    assert knn_predict(bank, labels, q, num_classes=2, k=1).item() == 0
    assert knn_predict(bank, labels, q, num_classes=2, k=3, temperature=0.07).item() == 0
    assert knn_predict(bank, labels, q, num_classes=2, k=3, temperature=100.0).item() == 1


def test_random_labels_are_near_chance():
    x, _ = _blobs(300, 0)
    y = torch.randint(0, 3, (300,), generator=torch.Generator().manual_seed(0))
    assert knn_top1(x[:200], y[:200], x[200:], y[200:]) < 0.6


def test_recalibrated_batch_norm_holds_the_exact_statistics_of_the_images():
    """Precise BN: after recalibration a BatchNorm layer's running mean is the mean of its
    input over all the images and its running variance the size-weighted average of the
    batches' variances (batches of unequal size); the mode and momentum are as before."""
    torch.manual_seed(0)
    for layer, shape, dims in (
        (torch.nn.Conv2d(3, 4, 3), (300, 3, 8, 8), (0, 2, 3)),
        (torch.nn.Linear(10, 5), (300, 10), (0,)),
    ):
        bn = torch.nn.BatchNorm2d(4) if len(shape) == 4 else torch.nn.BatchNorm1d(5)
        model = torch.nn.Sequential(layer, bn, torch.nn.ReLU())
        model.eval()
        images = torch.randn(*shape) * 3 + 1
        recalibrate_batch_norm(model, images, batch_size=128)  # 128 + 128 + 44
        assert not model.training and bn.momentum == 0.1
        with torch.no_grad():
            x = layer(images)
        torch.testing.assert_close(bn.running_mean, x.mean(dims), rtol=1e-4, atol=1e-5)
        var = sum(x[i : i + 128].var(dims, unbiased=True) * len(x[i : i + 128]) for i in range(0, 300, 128)) / 300
        torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-5)
