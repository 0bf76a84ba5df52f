"""The on-disk feature store: pooled features computed once, read by every later run.

  <root>/<group>/info.json                 what the group holds (model, SAE, layer, variants)
  <root>/<group>/shard-<sha256[:16]>.npz   rows of some texts, every variant of the group

A *group* is one SAE's variants (or one layer's hidden-state poolings) under one model; its
name is a hash of everything that changes those numbers: the model fingerprint (path, size
and mtime of its files, dtype, matmul precision), the block, the SAE fingerprint, the
variant names, the binarization threshold and which tokens are pooled. A row is keyed by a
hash of the text's token ids, so the tokenizer, BOS and `max_length` are in the key too.

Shards are written as extraction goes (every `shard_texts` texts), each atomically and
named by the hash of its bytes: a torn or altered shard fails that check, is logged and
deleted, and its texts are computed again; it is never read. Each variant is stored
compactly and exactly: CSR rows where mostly zero, values in the smallest dtype that holds
them (counts and binarized codes as uint8 / uint16), dense float32 only where needed.
`python -m mosaic_jax.store list|prune <root>` shows or cleans a store.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import io
import json
import os
import shutil
import threading
from typing import Any, Iterator, Mapping, Sequence

from absl import logging
import numpy as np

from mosaic_jax import checkpoint
from mosaic_jax import results

KEY_BYTES = 16           # blake2b digest of a text's token ids
SPARSE_FRACTION = 0.25   # CSR when at most this share of a variant's values are non-zero
FORMAT = 1               # shard layout version (in info.json and every shard)


@dataclasses.dataclass(frozen=True)
class StoreOptions:
    """config.store: where the store lives ('' = off) and how often extraction saves."""
    root: str = ''
    shard_texts: int = 256

    @property
    def enabled(self) -> bool:
        return bool(self.root)

    @classmethod
    def from_config(cls, config, single_process: bool = True) -> 'StoreOptions':
        """config.store (root '' = <workdir>/_features); off in a multi-host job, whose
        processes share no store."""
        s = config.store
        if not s.enabled:
            return cls()
        if not single_process:
            logging.warning('feature store off: one store per multi-host job is not supported')
            return cls()
        return cls(root=s.root or results.store_dir(config.workdir),
                   shard_texts=int(s.shard_texts))


def digest(obj: Any) -> str:
    """A short stable hash of JSON-able parts (group names, fingerprints)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def path_fingerprint(path: str) -> list:
    """(name, size, mtime) of a file or of every file under a folder: changes when the
    weights change, without reading gigabytes."""
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        st = os.stat(path)
        return [[os.path.abspath(path), st.st_size, int(st.st_mtime)]]
    out = []
    for f in sorted(glob.glob(os.path.join(path, '**', '*'), recursive=True)):
        if os.path.isfile(f):
            st = os.stat(f)
            out.append([os.path.relpath(f, path), st.st_size, int(st.st_mtime)])
    return [os.path.abspath(path), out] if out else [path]  # a hub reference stays a string


def fingerprint_label(fp: list) -> str:
    """The path (or hub reference) a `path_fingerprint` names, for people."""
    head = fp[0] if fp else ''
    return head if isinstance(head, str) else str(head[0])


def text_keys(token_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """uint8[N, KEY_BYTES]: one key per text, a hash of its token ids."""
    out = np.zeros((len(token_ids), KEY_BYTES), np.uint8)
    for i, ids in enumerate(token_ids):
        h = hashlib.blake2b(np.asarray(ids, np.int64).tobytes(), digest_size=KEY_BYTES)
        out[i] = np.frombuffer(h.digest(), np.uint8)
    return out


# ----------------------------------------------------------------------------------------
# Compact, exact encoding of one variant's rows
# ----------------------------------------------------------------------------------------

def _small_dtype(values: np.ndarray, dtype: np.dtype) -> np.dtype:
    """The smallest unsigned dtype that holds `values` exactly, else `dtype`."""
    if values.size == 0:
        return np.dtype(np.uint8)
    if np.issubdtype(dtype, np.floating) and not np.array_equal(values, np.round(values)):
        return dtype
    lo, hi = values.min(), values.max()
    if lo >= 0 and hi <= 255:
        return np.dtype(np.uint8)
    if lo >= 0 and hi <= 65535:
        return np.dtype(np.uint16)
    return dtype


def encode(a: np.ndarray, prefix: str) -> dict[str, np.ndarray]:
    """Arrays (names starting with `prefix`) that `decode` turns back into `a` exactly."""
    flat = a.reshape(len(a), -1)
    nz = flat != 0
    meta = dict(dtype=str(a.dtype), shape=list(a.shape[1:]))
    if nz.sum() <= SPARSE_FRACTION * flat.size:
        rows, cols = np.nonzero(nz)
        values = flat[rows, cols]
        meta['kind'] = 'csr'
        idx_dtype = np.uint16 if flat.shape[1] <= 65536 else np.uint32
        out = {f'{prefix}data': values.astype(_small_dtype(values, a.dtype)),
               f'{prefix}indices': cols.astype(idx_dtype),
               f'{prefix}indptr': np.concatenate(
                   [[0], np.cumsum(np.bincount(rows, minlength=len(flat)))]).astype(np.int64)}
    else:
        meta['kind'] = 'dense'
        out = {f'{prefix}data': flat.astype(_small_dtype(flat[nz], a.dtype))}
    out[f'{prefix}meta'] = np.asarray(json.dumps(meta))
    return out


def decode(arrays: Mapping[str, np.ndarray], prefix: str, rows: np.ndarray | None = None
           ) -> np.ndarray:
    """`encode`'s input (only `rows` of it when given), in its own dtype and shape."""
    meta = json.loads(str(arrays[f'{prefix}meta']))
    dtype, shape = np.dtype(meta['dtype']), tuple(meta['shape'])
    width = int(np.prod(shape))
    data = arrays[f'{prefix}data']
    if meta['kind'] == 'dense':
        flat = data.reshape(-1, width)
        flat = flat if rows is None else flat[rows]
        return flat.astype(dtype).reshape((len(flat),) + shape)
    indptr, indices = arrays[f'{prefix}indptr'], arrays[f'{prefix}indices']
    rows = np.arange(len(indptr) - 1) if rows is None else np.asarray(rows, np.int64)
    starts, counts = indptr[rows], indptr[rows + 1] - indptr[rows]
    out = np.zeros((len(rows), width), dtype)
    if counts.sum():  # every stored entry of the asked rows, in one scatter
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        seg = np.repeat(starts - first, counts) + np.arange(int(counts.sum()))
        out[np.repeat(np.arange(len(rows)), counts), indices[seg]] = data[seg]
    return out.reshape((len(rows),) + shape)


# ----------------------------------------------------------------------------------------
# A group: shards of one SAE's (or layer's) variants
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Group:
    """The stored rows of one feature group (see module docstring)."""
    folder: str
    names: tuple[str, ...]               # variant names, the order of the shard arrays
    shards: list = dataclasses.field(default_factory=list)   # loaded shard dicts
    where: dict = dataclasses.field(default_factory=dict)    # key bytes -> (shard, row)

    @classmethod
    def open(cls, root: str, name: str, names: Sequence[str], info: dict) -> 'Group':
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        info_path = os.path.join(folder, 'info.json')
        if not os.path.exists(info_path):
            checkpoint.atomic_write_json(info_path, dict(info, variants=list(names),
                                                         format=FORMAT))
        group = cls(folder, tuple(names))
        for path in sorted(glob.glob(os.path.join(folder, 'shard-*.npz'))):
            group._load(path)
        return group

    def _load(self, path: str) -> None:
        with open(path, 'rb') as f:
            raw = f.read()
        name = os.path.basename(path)
        if name != f'shard-{hashlib.sha256(raw).hexdigest()[:16]}.npz':
            logging.warning('feature store: %s is torn or altered (hash mismatch); deleted, '
                            'its texts are computed again', path)
            os.remove(path)
            return
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        if tuple(json.loads(str(arrays['names']))) != self.names:
            logging.warning('feature store: %s holds other variants; ignored', path)
            return
        s = len(self.shards)
        self.shards.append(arrays)
        for row, key in enumerate(arrays['keys']):
            self.where.setdefault(key.tobytes(), (s, row))

    def missing(self, keys: np.ndarray) -> np.ndarray:
        """Indices of `keys` not stored yet."""
        return np.asarray([i for i, k in enumerate(keys) if k.tobytes() not in self.where],
                          np.int64)

    def write(self, keys: np.ndarray, values: Mapping[str, np.ndarray]) -> None:
        """One shard with rows `keys` of every variant (values: name -> [n, ...])."""
        arrays = dict(keys=np.asarray(keys, np.uint8), names=np.asarray(json.dumps(self.names)),
                      format=np.asarray(FORMAT))
        for i, name in enumerate(self.names):
            arrays.update(encode(np.asarray(values[name]), f'v{i}.'))
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        raw = buf.getvalue()
        path = os.path.join(self.folder, f'shard-{hashlib.sha256(raw).hexdigest()[:16]}.npz')
        checkpoint.atomic_write_bytes(path, raw)
        s = len(self.shards)
        self.shards.append(arrays)
        for row, key in enumerate(arrays['keys']):
            self.where.setdefault(key.tobytes(), (s, row))

    def read(self, name: str, keys: np.ndarray) -> np.ndarray:
        """[len(keys), ...] rows of variant `name`, in the order of `keys` (all stored)."""
        i = self.names.index(name)
        loc = np.asarray([self.where[k.tobytes()] for k in keys], np.int64).reshape(-1, 2)
        out = None
        for s in np.unique(loc[:, 0]):
            mine = np.flatnonzero(loc[:, 0] == s)
            part = decode(self.shards[s], f'v{i}.', loc[mine, 1])
            if out is None:
                out = np.empty((len(keys),) + part.shape[1:], part.dtype)
            out[mine] = part
        return out


class StoredFeatures(Mapping):
    """variant -> [N, F] read from the store on use, in the row order of the texts: what
    `steps.extract` returns, holding the most recently read variants densely in memory
    while they total at most `held_bytes` (always the last one read): every variant of the
    usual SAEs, one at a time of a 65k SAE over thousands of texts (1.3 GB each).

    Attributes:
      n_computed: how many of the texts this run extracted (the rest came from the store).
    """

    def __init__(self, groups: Mapping[Any, tuple[Group, str]], keys: np.ndarray, *,
                 n_computed: int = 0, held_bytes: int = 2**30):
        self._groups, self._keys = dict(groups), keys
        self._held: dict[Any, np.ndarray] = {}
        self._max_bytes = int(held_bytes)
        self._lock = threading.Lock()  # the probe stage reads from several threads
        self.n_computed = n_computed

    def __getitem__(self, variant) -> np.ndarray:
        with self._lock:
            if variant in self._held:
                self._held[variant] = self._held.pop(variant)  # most recently used last
                return self._held[variant]
            group, name = self._groups[variant]
            # Make room first (the next variant is about the size of the largest held
            # one), so a wide SAE's old variant is gone before its next one is decoded.
            sizes = [a.nbytes for a in self._held.values()]
            while sizes and sum(sizes) + max(sizes) > self._max_bytes:
                self._held.pop(next(iter(self._held)))
                sizes.pop(0)
            self._held[variant] = value = group.read(name, self._keys)
            return value

    def __contains__(self, variant) -> bool:  # a membership test reads nothing
        return variant in self._groups

    def __iter__(self) -> Iterator:
        return iter(self._groups)

    def __len__(self) -> int:
        return len(self._groups)


# ----------------------------------------------------------------------------------------
# Listing and pruning: python -m mosaic_jax.store list|prune <root>
# ----------------------------------------------------------------------------------------

def describe(root: str) -> list[dict]:
    """One dict per group: name, info, shards, texts, bytes on disk, dense float32 bytes."""
    out = []
    for folder in sorted(glob.glob(os.path.join(root, '*', 'info.json'))):
        folder = os.path.dirname(folder)
        info = checkpoint.read_json(os.path.join(folder, 'info.json'))
        shards = sorted(glob.glob(os.path.join(folder, 'shard-*.npz')))
        n = dense = 0
        for path in shards:
            with np.load(path, allow_pickle=False) as z:
                rows = len(z['keys'])
                n += rows
                dense += sum(rows * int(np.prod(json.loads(str(z[k]))['shape'])) * 4
                             for k in z.files if k.endswith('.meta'))
        out.append(dict(group=os.path.basename(folder), info=info, shards=len(shards), texts=n,
                        bytes=sum(os.path.getsize(p) for p in shards), dense_float32=dense))
    return out


def prune(root: str, keep: Sequence[str] = ()) -> list[str]:
    """Deletes every group not named in `keep` (all when empty); returns what went."""
    gone = [g['group'] for g in describe(root) if g['group'] not in keep]
    for g in gone:
        shutil.rmtree(os.path.join(root, g))
    return gone


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description='List or prune a mosaic_jax feature store.')
    p.add_argument('command', choices=('list', 'prune'))
    p.add_argument('root', help='the store folder (default of a run: <workdir>/_features)')
    p.add_argument('--keep', nargs='*', default=(), help='prune: groups to keep')
    a = p.parse_args(argv)
    if a.command == 'prune':
        for g in prune(a.root, a.keep):
            print(f'deleted {g}')
        return
    total = dense = 0
    for g in describe(a.root):
        total, dense = total + g['bytes'], dense + g['dense_float32']
        what = g['info'].get('sae') or f"hidden states, layer {g['info'].get('layer')}"
        print(f"{g['group']}  {g['texts']:>7} texts  {g['bytes'] / 2**20:8.1f} MiB "
              f"(dense float32 {g['dense_float32'] / 2**20:.1f} MiB)  {what}")
    print(f'total {total / 2**20:.1f} MiB on disk; dense float32 would be '
          f'{dense / 2**20:.1f} MiB')


if __name__ == '__main__':
    main()
