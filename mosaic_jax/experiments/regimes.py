"""sae-probes' regimes as training-row choices over one split (test rows never change).

Kantamneni et al. 2025 compare probes in five settings; each is a function of the training
pool (the split's train + validation rows), the labels and a seed, so every regime reuses
one extraction:
  * standard: the split as it is;
  * scarcity: a stratified subsample of `n` training rows;
  * imbalance (binary): the largest training subsample whose positive (class 1) fraction is f;
  * noise: a fraction f of the training labels flipped (binary: 1 - y; multiclass: another
    class at random);
  * ood: train on the base dataset, test on the collection's shifted test file.
"""
from __future__ import annotations

import dataclasses
import enum

import numpy as np


class Kind(str, enum.Enum):
    STANDARD = 'standard'
    SCARCITY = 'scarcity'
    IMBALANCE = 'imbalance'
    NOISE = 'noise'
    OOD = 'ood'


@dataclasses.dataclass(frozen=True)
class Regime:
    """One regime and its setting (train size, positive or noise fraction; None: none)."""
    kind: Kind
    setting: float | int | None = None

    @property
    def name(self) -> str:
        """'standard', 'scarcity=64', 'imbalance=0.05': what summary rows and claims print."""
        if self.setting is None:
            return self.kind.value
        return f'{self.kind.value}={self.setting:g}'


@dataclasses.dataclass(frozen=True)
class Options:
    """Which regimes a benchmark runs (config.benchmark)."""
    kinds: tuple[Kind, ...] = tuple(Kind)
    train_sizes: tuple[int, ...] = (16, 64, 256, 1024)
    positive_fractions: tuple[float, ...] = (0.05, 0.2)
    noise_fractions: tuple[float, ...] = (0.1, 0.3)
    min_class_rows: int = 5     # per class in a training subsample (the CV folds need it)

    def regimes(self, num_classes: int, has_ood: bool) -> list[Regime]:
        """The regimes of one dataset, in order; imbalance only for binary sets, OOD only
        where a shifted test file exists."""
        out = []
        for k in self.kinds:
            if k is Kind.SCARCITY:
                out += [Regime(k, int(n)) for n in self.train_sizes]
            elif k is Kind.IMBALANCE and num_classes == 2:
                out += [Regime(k, float(f)) for f in self.positive_fractions]
            elif k is Kind.NOISE:
                out += [Regime(k, float(f)) for f in self.noise_fractions]
            elif k is Kind.STANDARD or (k is Kind.OOD and has_ood):
                out.append(Regime(k))
        return out


def scarce_rows(y: np.ndarray, pool: np.ndarray, n: int, seed: int,
                min_class_rows: int = 5) -> np.ndarray:
    """Sorted int[n]: a stratified, seeded subsample of `pool` with >= min_class_rows rows
    of every class. Raises ValueError when n is not below the pool or too small."""
    pool = np.asarray(pool)
    classes = np.unique(y[pool])
    if n >= len(pool):
        raise ValueError(f'train size {n} is not below the {len(pool)} training rows')
    if n < min_class_rows * len(classes):
        raise ValueError(f'train size {n} cannot hold {min_class_rows} rows of each of '
                         f'{len(classes)} classes')
    counts = np.asarray([np.sum(y[pool] == c) for c in classes])
    # Proportional shares, at least min_class_rows each; rounding goes to the largest class.
    want = np.minimum(counts, np.maximum(min_class_rows, n * counts // counts.sum()))
    while want.sum() != n:
        step = 1 if want.sum() < n else -1
        room = (counts - want) if step > 0 else (want - min_class_rows)
        want[int(np.argmax(np.where(room > 0, want, -1)))] += step
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.permutation(pool[y[pool] == c])[:w]
                                   for c, w in zip(classes, want)]))


def imbalanced_rows(y: np.ndarray, pool: np.ndarray, fraction: float, seed: int,
                    min_class_rows: int = 5) -> np.ndarray:
    """Sorted rows of `pool` whose class-1 fraction is `fraction` (binary labels): every row
    of the class that limits it, a seeded sample of the other."""
    pool = np.asarray(pool)
    pos, neg = pool[y[pool] == 1], pool[y[pool] == 0]
    if not 0.0 < fraction < 1.0:
        raise ValueError(f'positive fraction {fraction} must lie strictly between 0 and 1')
    total = int(min(len(pos) / fraction, len(neg) / (1.0 - fraction)))
    n_pos = int(round(fraction * total))
    n_neg = total - n_pos
    if min(n_pos, n_neg) < min_class_rows:
        raise ValueError(f'positive fraction {fraction}: {n_pos} positives and {n_neg} '
                         f'negatives, fewer than {min_class_rows} of one class')
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.permutation(pos)[:n_pos],
                                   rng.permutation(neg)[:n_neg]]))


def noisy_labels(y: np.ndarray, pool: np.ndarray, fraction: float, num_classes: int,
                 seed: int) -> np.ndarray:
    """A copy of y with round(fraction * |pool|) labels of `pool` rows changed (binary:
    flipped; multiclass: another class uniformly); rows outside the pool untouched."""
    rng = np.random.default_rng(seed)
    pool = np.asarray(pool)
    flip = rng.permutation(pool)[:int(round(fraction * len(pool)))]
    out = np.array(y, copy=True)
    out[flip] = (out[flip] + rng.integers(1, num_classes, size=len(flip))) % num_classes
    return out
