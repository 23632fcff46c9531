"""Ground truth for guidance on ``model=gmm`` (:mod:`stablefused.families.gmm`): exact samples of the
mixture's conditionals and of the tilted target p(x | c)^w · p(x)^(1−w) that CFG's combined score is the
score of, and the distances used to compare a sampler's points with them.

* :func:`exact_samples` — i.i.d. samples of p(x | labels) (all components for no labels: p(x)).
* :func:`tilted_samples` — samples of p_w(x) ∝ p(x | c)^w p(x)^(1−w), from its density on a fine grid
  (2-D; the grid's cell is 1/100 of the view, far below the components' widths).
* :func:`sliced_w2` — sliced Wasserstein-2 distance between two point sets (mean over random directions
  of the 1-D W2 between sorted projections; equal-size sets).
* :func:`mode_masses` — the fraction of points nearest (by responsibility at t = 0) to each component.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _arrays(components: Sequence[dict], labels: Sequence[str]):
    keep = [c for c in components if not labels or c["label"] in labels]
    w = np.array([float(c["weight"]) for c in keep])
    return keep, w / w.sum(), np.array([c["mean"] for c in keep], float), np.array([float(c["std"]) for c in keep])


def exact_samples(components: Sequence[dict], labels: Sequence[str], n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of the mixture restricted to components with one of ``labels`` (all if empty)."""
    _, w, means, stds = _arrays(components, labels)
    k = rng.choice(len(w), size=n, p=w)
    return means[k] + stds[k, None] * rng.normal(size=(n, means.shape[1]))


def log_density(components: Sequence[dict], labels: Sequence[str], x: np.ndarray) -> np.ndarray:
    """log p(x | labels) at points x (N, D)."""
    _, w, means, stds = _arrays(components, labels)
    d = x.shape[1]
    sq = ((x[:, None, :] - means[None]) ** 2).sum(-1)
    logn = -sq / (2 * stds**2) - d * np.log(stds) - 0.5 * d * np.log(2 * np.pi)
    m = logn.max(1, keepdims=True)
    return (m + np.log((w[None] * np.exp(logn - m)).sum(1, keepdims=True)))[:, 0]


def tilted_samples(components: Sequence[dict], label: str, w: float, n: int, rng: np.random.Generator,
                   view: float = 6.0, cells: int = 600) -> np.ndarray:
    """``n`` samples of p(x | label)^w · p(x)^(1−w) (normalised), 2-D, drawn from a ``cells``² grid on
    [−view, view]² with uniform jitter inside the cell."""
    edge = np.linspace(-view, view, cells + 1)
    mid = (edge[:-1] + edge[1:]) / 2
    xx, yy = np.meshgrid(mid, mid, indexing="ij")
    pts = np.stack([xx.ravel(), yy.ravel()], 1)
    logp = w * log_density(components, [label], pts) + (1 - w) * log_density(components, [], pts)
    p = np.exp(logp - logp.max())
    idx = rng.choice(len(pts), size=n, p=p / p.sum())
    step = edge[1] - edge[0]
    return pts[idx] + rng.uniform(-step / 2, step / 2, size=(n, 2))


def sliced_w2(a: np.ndarray, b: np.ndarray, directions: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between point sets ``a`` and ``b`` (same size): the root mean square,
    over ``directions`` random unit directions, of the 1-D W2 between their projections."""
    if len(a) != len(b):
        raise ValueError(f"sliced_w2 needs equal-size sets, got {len(a)} and {len(b)}")
    theta = np.random.default_rng(seed).normal(size=(directions, a.shape[1]))
    theta /= np.linalg.norm(theta, axis=1, keepdims=True)
    pa, pb = np.sort(a @ theta.T, axis=0), np.sort(b @ theta.T, axis=0)
    return float(np.sqrt(((pa - pb) ** 2).mean()))


def mode_masses(components: Sequence[dict], x: np.ndarray) -> np.ndarray:
    """Fraction of the points ``x`` whose most responsible component (at t = 0) is each component."""
    _, w, means, stds = _arrays(components, [])
    d = x.shape[1]
    logr = np.log(w)[None] - ((x[:, None, :] - means[None]) ** 2).sum(-1) / (2 * stds**2) - d * np.log(stds)
    return np.bincount(logr.argmax(1), minlength=len(w)) / len(x)
