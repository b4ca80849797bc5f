import torch

from cl_core.evaluate import knn_predict, knn_top1, linear_probe_top1


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
