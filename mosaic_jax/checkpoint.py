"""All artefact I/O: orbax pytrees and atomic text/JSON writes."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np


def atomic_write_text(path: str, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically (see atomic_write_bytes)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path` via a temp file in the same folder and a rename: readers see
    the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _json_default(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "to_dict"):  # ml_collections.ConfigDict
        return o.to_dict()
    return str(o)


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default))


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def save_pytree(path: str, tree: Any) -> None:
    """Saves a pytree of arrays with orbax; the folder appears only when complete."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    tmp = path + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp, tree)
        ckptr.wait_until_finished()
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def restore_pytree(path: str, target: Any | None = None) -> Any:
    """Restores a pytree saved by `save_pytree` (as numpy-backed jax arrays)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no orbax checkpoint at {path}")
    with ocp.StandardCheckpointer() as ckptr:
        if target is None:
            return ckptr.restore(path)
        return ckptr.restore(path, target)
