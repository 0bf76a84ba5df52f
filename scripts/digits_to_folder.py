"""Writes scikit-learn's bundled digits (real 8x8 scans, offline) as an image folder.

    python scripts/digits_to_folder.py OUT [--per_class N] [--size S]

OUT/<digit>/<row>.png (grayscale PNG, 0..16 scaled to 0..255, nearest-upscaled to S px)
and OUT.csv (columns image, label; paths relative to the CSV) for the table loader.
"""
from __future__ import annotations

import argparse
import csv
import os

import numpy as np


def convert(out: str, per_class: int | None = None, size: int = 8) -> int:
    """Writes the folder and the CSV; returns the number of images written."""
    from PIL import Image
    from sklearn.datasets import load_digits
    digits = load_digits()
    # The scans hold 0..16 ink levels (sklearn's DESCR); 16 -> 255 keeps every level distinct.
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    counts: dict[int, int] = {}
    rows = []
    for i, (img, y) in enumerate(zip(pixels, digits.target)):
        y = int(y)
        if per_class is not None and counts.get(y, 0) >= per_class:
            continue
        counts[y] = counts.get(y, 0) + 1
        os.makedirs(os.path.join(out, str(y)), exist_ok=True)
        rel = os.path.join(str(y), f'{i:04d}.png')
        image = Image.fromarray(img, mode='L')
        if size != 8:
            image = image.resize((size, size), Image.Resampling.NEAREST)
        image.save(os.path.join(out, rel))
        rows.append((os.path.join(os.path.basename(os.path.normpath(out)), rel), y))
    with open(os.path.normpath(out) + '.csv', 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['image', 'label'])
        writer.writerows(rows)
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('out')
    parser.add_argument('--per_class', type=int, default=None)
    parser.add_argument('--size', type=int, default=8)
    args = parser.parse_args()
    n = convert(args.out, args.per_class, args.size)
    print(f'wrote {n} images to {args.out}/ and {os.path.normpath(args.out)}.csv')


if __name__ == '__main__':
    main()
