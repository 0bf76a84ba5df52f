"""Typed names of what a run computes: SAE keys, feature variants, widths.

A variant is a value, never a string parsed back: every file (summary.csv, results JSON,
report, logs) prints `Variant.name`, and code that needs the layer or the pooling reads the
field. Pure Python (no jax), so the report can use it without the model stack.
"""
from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

# Poolings whose value depends on top_n (features.py: MOSAIC's top-n counts; 0 = sum).
TOP_N_POOLINGS = ('mosaic',)

_WIDTH = re.compile(r'(\d+)([kKmM]?)')


def parse_width(width: str | int) -> int:
    """'16k' -> 16384, '65k' -> 65536, '1m' -> 1048576, '128' -> 128.

    Gemma Scope names its widths by the power of two, truncated to thousands (65536 is
    '65k', 131072 '131k', 2**20 '1m'); a 'k' / 'm' name that is no such power is n * 1024
    (or n * 1024**2).

    Raises:
      ValueError: for anything else.
    """
    m = _WIDTH.fullmatch(str(width))
    if not m:
        raise ValueError(f'sae width {width!r} is not like 16k, 65k, 1m or 4096')
    n, unit = int(m.group(1)), m.group(2).lower()
    if not unit:
        return n
    scale = 1000 if unit == 'k' else 1000 ** 2
    for p in range(1, 41):
        if 2 ** p // scale == n:
            return 2 ** p
    return n * (1024 if unit == 'k' else 1024 ** 2)


def width_order(width: str) -> tuple:
    """Sort key for width names ('1m' after '131k'); unknown names sort last."""
    try:
        return (0, parse_width(width))
    except ValueError:
        return (1, str(width))


class SAEKey(NamedTuple):
    """One SAE of a run: the config layer it reads and its width name ('16k')."""
    layer: int
    width: str

    @property
    def name(self) -> str:
        return f'layer_{self.layer}/{self.width}'

    def __str__(self) -> str:
        return self.name


@dataclasses.dataclass(frozen=True, order=True)
class Variant:
    """One pooled feature set of one SAE: [N, F] per text."""
    sae: SAEKey
    pooling: str
    top_n: int = 0
    binarized: bool = False

    @property
    def layer(self) -> int:
        return self.sae.layer

    @property
    def width(self) -> str:
        return self.sae.width

    @property
    def name(self) -> str:
        """The variant's name within its SAE: 'mean', 'mosaic_top20+bin', 'max+bin'."""
        top = f'_top{self.top_n}' if self.pooling in TOP_N_POOLINGS and self.top_n else ''
        return self.pooling + top + ('+bin' if self.binarized else '')

    @property
    def full_name(self) -> str:
        """Unique across a run: 'layer_8/16k/mean+bin' (logs, feature dicts)."""
        return f'{self.sae.name}/{self.name}'

    def __str__(self) -> str:
        return self.full_name


@dataclasses.dataclass(frozen=True, order=True)
class HiddenVariant:
    """A hidden-state baseline: the residual at a config layer, pooled ('last' | 'mean')."""
    layer: int
    pooling: str

    @property
    def name(self) -> str:
        return f'hidden_{self.pooling}'

    @property
    def full_name(self) -> str:
        return f'layer_{self.layer}/{self.name}'

    def __str__(self) -> str:
        return self.full_name


@dataclasses.dataclass(frozen=True, order=True)
class PeakPosition:
    """Where each feature of one SAE peaks in each text, beside its max pooling: int16[N, F],
    the position in the text's token ids of the max-pooled value (the first such token),
    0 where the feature never fires. Not a probe variant: the explanations read it, so they
    need no second pass over the texts."""
    sae: SAEKey

    @property
    def name(self) -> str:
        return 'max_position'

    @property
    def full_name(self) -> str:
        return f'{self.sae.name}/{self.name}'

    def __str__(self) -> str:
        return self.full_name
