"""Sample quality without downloads: a small classifier's features, FID, precision/recall, class histogram.

Inception-v3 weights cannot be fetched offline, so FID here is computed on the penultimate features
of a classifier trained on the real data (:class:`FeatureClassifier`); tables call it
``FID_NAME`` — "FID on Fashion-MNIST-classifier features (not Inception FID)" for that dataset.
Its numbers are comparable with each other, not with published Inception FIDs.

- :func:`frechet_distance`: ``|μ_a − μ_b|² + tr(Σ_a + Σ_b − 2 (Σ_a^½ Σ_b Σ_a^½)^½)`` in float64.
- :func:`precision_recall`: Kynkäänniemi et al. 2019: each set's manifold is the union of balls
  around its points with radius the distance to the ``k``-th nearest neighbour in the same set;
  precision = share of generated points inside the real manifold, recall = share of real points
  inside the generated one.
- :func:`class_histogram`: the classifier's predicted classes of a set (diversity).

Example:
    >>> import torch
    >>> a = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
    >>> round(frechet_distance(a, a), 6)
    0.0
    >>> precision_recall(a, a, k=3)
    (1.0, 1.0)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FID_NAME", "FeatureClassifier", "class_histogram", "classifier_features", "frechet_distance",
           "histogram_entropy", "precision_recall", "train_classifier"]

FID_NAME = "FID on Fashion-MNIST-classifier features (not Inception FID)"


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class FeatureClassifier(nn.Module):
    """A small CNN for ``(N, C, 32, 32)`` images in [-1, 1]; ``features`` gives the penultimate vector.

    >>> FeatureClassifier().features(torch.zeros(2, 1, 32, 32)).shape
    torch.Size([2, 128])
    """

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 32, feature_dim: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _block(in_chans, width), nn.MaxPool2d(2),
            _block(width, width), _block(width, 2 * width), nn.MaxPool2d(2),
            _block(2 * width, 2 * width), _block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.penultimate = nn.Sequential(nn.Linear(4 * width, feature_dim), nn.ReLU(inplace=True))
        self.fc = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.penultimate(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


def train_classifier(
    images: Tensor,
    labels: Tensor,
    *,
    cache_dir: str | Path | None = None,
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
) -> FeatureClassifier:
    """Train (or load from ``cache_dir``) a :class:`FeatureClassifier` on float images in [-1, 1].

    The cache file name holds a digest of the data and the settings, so a different training set or
    recipe trains a new classifier. Augmentation: random shifts of up to 2 pixels.

    >>> x = torch.randn(16, 1, 32, 32); y = torch.arange(16) % 10
    >>> train_classifier(x, y, epochs=1, batch_size=8).fc.out_features
    10
    """
    num_classes = int(labels.max()) + 1
    key = hashlib.sha256()
    key.update(json.dumps([list(images.shape), epochs, batch_size, lr, seed, num_classes]).encode())
    key.update(images[:: max(1, len(images) // 256)].numpy().tobytes())
    path = Path(cache_dir) / f"fid_classifier_{key.hexdigest()[:16]}.pt" if cache_dir is not None else None
    model = FeatureClassifier(images.shape[1], num_classes)
    if path is not None and path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    steps = epochs * (len(images) // batch_size or 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _epoch in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for start in range(0, max(len(images) - batch_size + 1, 1), batch_size):
            idx = order[start:start + batch_size]
            x = images[idx]
            dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
            x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched.last_epoch + 1 < steps:
                sched.step()
    model.eval()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    return model


@torch.no_grad()
def classifier_features(model: FeatureClassifier, images: Tensor, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
    """Penultimate features ``(N, D)`` and predicted classes ``(N,)`` of ``images``.

    >>> f, c = classifier_features(FeatureClassifier().eval(), torch.zeros(3, 1, 32, 32))
    >>> f.shape, c.shape
    (torch.Size([3, 128]), torch.Size([3]))
    """
    model.eval()
    feats, preds = [], []
    for start in range(0, len(images), batch_size):
        f = model.features(images[start:start + batch_size])
        feats.append(f)
        preds.append(model.fc(f).argmax(1))
    return torch.cat(feats), torch.cat(preds)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` ``(N, D)`` and ``b`` ``(M, D)``.

    >>> g = torch.Generator().manual_seed(0)
    >>> a, b = torch.randn(2000, 2, generator=g), torch.randn(2000, 2, generator=g) + 3
    >>> 17.0 < frechet_distance(a, b) < 19.0  # |μ shift|² = 18
    True
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance needs two (N, D) sets with N >= 2, got {tuple(a.shape)}, {tuple(b.shape)}")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    w, v = torch.linalg.eigh(cov_a)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    middle = root_a @ cov_b @ root_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    value = (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return max(float(value), 0.0)


def _kth_radius(x: Tensor, k: int, chunk: int) -> Tensor:
    """Distance of each row of ``x`` to its ``k``-th nearest other row."""
    out = []
    for start in range(0, len(x), chunk):
        d = torch.cdist(x[start:start + chunk], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the 1st is the point itself (distance 0)
    return torch.cat(out)


def _covered(query: Tensor, centers: Tensor, radii: Tensor, chunk: int) -> Tensor:
    """Whether each query row lies within some ball (center, radius)."""
    out = []
    for start in range(0, len(query), chunk):
        d = torch.cdist(query[start:start + chunk], centers)
        out.append((d <= radii[None, :]).any(1))
    return torch.cat(out)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, chunk: int = 1000) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with ``k``-NN radii.

    >>> g = torch.Generator().manual_seed(0)
    >>> real = torch.randn(400, 2, generator=g)
    >>> p, r = precision_recall(real, real[real[:, 0] > 1], k=3)  # one tail of the real set: precise, low recall
    >>> p, r < 0.5
    (1.0, True)
    """
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision_recall needs more than k={k} points per set, got {len(real)} and {len(fake)}")
    real, fake = real.float(), fake.float()
    precision = _covered(fake, real, _kth_radius(real, k, chunk), chunk).float().mean()
    recall = _covered(real, fake, _kth_radius(fake, k, chunk), chunk).float().mean()
    return float(precision), float(recall)


def class_histogram(predictions: Tensor, num_classes: int) -> list[int]:
    """Counts of each predicted class.

    >>> class_histogram(torch.tensor([0, 2, 2]), 3)
    [1, 0, 2]
    """
    return torch.bincount(predictions, minlength=num_classes).tolist()


def histogram_entropy(counts: Sequence[int]) -> float:
    """Entropy of a histogram in bits (log2 of the class count when uniform).

    >>> histogram_entropy([5, 5, 5, 5])
    2.0
    """
    p = torch.tensor(counts, dtype=torch.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())
