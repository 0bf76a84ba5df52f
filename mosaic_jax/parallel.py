"""Everything device-aware: pmap / mesh / single, multi-host set-up, process-wide settings.

The compiled steps (`steps.py`) are pure functions of replicated parameters and per-row
arrays; this module decides how they run. `config.parallel.mode` picks one of:
  - 'pmap': `jax.pmap` over local devices, the batch split on a leading device axis;
  - 'mesh': `jax.jit` with `NamedSharding` on a 1-D ('data',) mesh, also multi-host;
  - 'single': plain `jax.jit` on the default device.
No other module calls `jax.pmap`, `make_mesh`, `device_put` onto a sharding,
`process_allgather` or `make_array_from_process_local_data`.
"""
from __future__ import annotations

import dataclasses
import enum
import os
from typing import Callable

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

AXIS = 'data'  # the one mesh / pmap axis: rows of a batch

_DISTRIBUTED_READY = False
_COMPILE_SECONDS = [0.0]  # XLA compile time of this process (jax.monitoring events)
_COMPILE_EVENTS = ('/jax/core/compile/backend_compile_duration',)


def _on_duration(event: str, seconds: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        _COMPILE_SECONDS[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def compile_seconds() -> float:
    """Seconds this process has spent compiling XLA programs so far (a persistent cache
    hit costs no backend compile, so a second identical run shows what the cache saved)."""
    return _COMPILE_SECONDS[0]


def set_compile_cache(cache_dir: str) -> None:
    """Persistent compilation cache in `cache_dir` ('~' expanded; '' leaves it off)."""
    if not cache_dir:
        return
    path = os.path.expanduser(cache_dir)
    os.makedirs(path, exist_ok=True)
    jax.config.update('jax_compilation_cache_dir', path)
    # Every program, however quick to compile: the probe stage builds hundreds of small
    # ones (per row bucket, class count, C path), and with a 0.2 s floor a second run
    # still spent 2.6 of the first run's 11.5 compile seconds on them.
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


class Mode(str, enum.Enum):
    """How a compiled step runs (config.parallel.mode)."""
    PMAP = 'pmap'
    MESH = 'mesh'
    SINGLE = 'single'


@dataclasses.dataclass(frozen=True)
class ProcessOptions:
    """The process-wide settings of a run (config.parallel, compile_cache, matmul precision)."""
    distributed: bool = False
    cpu_collectives: str = ''
    coordinator_address: str = ''
    num_processes: int = 0
    process_id: int = -1
    compile_cache: str = ''
    matmul_precision: str = 'default'

    @classmethod
    def from_config(cls, config) -> 'ProcessOptions':
        p = config.parallel
        return cls(distributed=bool(p.distributed), cpu_collectives=p.cpu_collectives or '',
                   coordinator_address=p.coordinator_address or '',
                   num_processes=int(p.num_processes), process_id=int(p.process_id),
                   compile_cache=config.compile_cache or '',
                   matmul_precision=config.model.matmul_precision)


def configure_process(opts: ProcessOptions) -> None:
    """Sets a run's process-wide settings once: joins a multi-host job when
    `opts.distributed` (idempotent), turns on the persistent compilation cache and sets the
    default matmul precision."""
    init_distributed(opts)
    set_compile_cache(opts.compile_cache)
    if opts.matmul_precision != 'default':
        jax.config.update('jax_default_matmul_precision', opts.matmul_precision)


def init_distributed(opts: ProcessOptions) -> None:
    """Joins a multi-host job (jax.distributed) when `opts.distributed`; idempotent."""
    global _DISTRIBUTED_READY
    if not opts.distributed or _DISTRIBUTED_READY:
        return
    if opts.cpu_collectives:
        jax.config.update('jax_cpu_collectives_implementation', opts.cpu_collectives)
    kwargs = {}
    if opts.coordinator_address:  # TPU VMs find the coordinator themselves
        kwargs = dict(coordinator_address=opts.coordinator_address,
                      num_processes=opts.num_processes, process_id=opts.process_id)
    jax.distributed.initialize(**kwargs)
    _DISTRIBUTED_READY = True
    logging.info('process %d of %d, local devices %s', jax.process_index(),
                 jax.process_count(), jax.local_devices())


def single_process() -> bool:
    """True unless this is one process of a multi-host job."""
    return jax.process_count() == 1


def is_writer() -> bool:
    """Only process 0 writes result files."""
    return jax.process_index() == 0


def sync_run_id(run_id: str) -> str:
    """All hosts of a multi-host job must write under the same run id (process 0's)."""
    if jax.process_count() == 1:
        return run_id
    code = np.frombuffer(run_id.encode().ljust(32), np.uint8)
    code = multihost_utils.broadcast_one_to_all(code)
    return bytes(np.asarray(code)).decode().strip()


@dataclasses.dataclass
class Devices:
    """Replicate / split / gather for one data-parallel mode (the only place that knows)."""
    mode: Mode

    def __post_init__(self):
        self.mode = Mode(self.mode)
        # Auto axes: XLA propagates the row sharding itself. (Explicit axes, the default
        # of newer jax, reject the top-n count's scatter whose output sharding it cannot
        # infer.)
        auto = (AxisType.Auto,)
        if self.mode is Mode.SINGLE:
            self.mesh = jax.make_mesh((1,), (AXIS,), auto, devices=jax.local_devices()[:1])
        else:
            self.mesh = jax.make_mesh((jax.device_count(),), (AXIS,), auto)
        self.rows = NamedSharding(self.mesh, P(AXIS))
        self.repl = NamedSharding(self.mesh, P())

    @property
    def count(self) -> int:
        """Devices that share one global batch."""
        return self.mesh.devices.size

    @property
    def local_count(self) -> int:
        return len(self.mesh.local_devices)

    @property
    def axis_name(self) -> str | None:
        """The axis a step must reduce over itself (pmap only; jit's sharding does it)."""
        return AXIS if self.mode is Mode.PMAP else None

    def replicate(self, tree):
        """Places parameters on every device once (all modes use a replicated sharding)."""
        return jax.device_put(tree, self.repl)

    def local_rows(self, global_rows: int) -> slice:
        """This process's slice of a global batch (each host feeds its own rows)."""
        per = global_rows // jax.process_count()
        return slice(jax.process_index() * per, (jax.process_index() + 1) * per)

    def split(self, *arrays: np.ndarray):
        """Global host batch [B, ...] -> what the compiled function takes.

        pmap: this host's rows reshaped to [local_devices, B_local / local_devices, ...].
        mesh/single: one global jax.Array sharded over rows.
        """
        out = []
        for a in arrays:
            a = np.asarray(a)
            local = a[self.local_rows(a.shape[0])]
            if self.mode is Mode.PMAP:
                out.append(local.reshape(self.local_count, -1, *local.shape[1:]))
            elif jax.process_count() > 1:
                out.append(jax.make_array_from_process_local_data(self.rows, local))
            else:
                out.append(jax.device_put(local, self.rows))
        return out

    def gather(self, tree):
        """Compiled output -> numpy [B, ...] in global row order, on every host."""
        def one(x):
            if self.mode is Mode.PMAP:
                x = np.asarray(x).reshape(-1, *x.shape[2:])  # this host's rows
            if jax.process_count() > 1:
                return np.asarray(multihost_utils.process_allgather(x, tiled=True))
            return np.asarray(x)
        return jax.tree.map(one, tree)

    def compile(self, fn: Callable, n_replicated: int, n_rows: int):
        """Compiles `fn(*replicated, *rows)` for this mode (outputs keep XLA's layout)."""
        if self.mode is Mode.PMAP:
            return jax.pmap(fn, axis_name=AXIS, in_axes=(None,) * n_replicated + (0,) * n_rows)
        return jax.jit(fn, in_shardings=(self.repl,) * n_replicated + (self.rows,) * n_rows)

    def unreplicate(self, tree):
        """Replicated outputs (updated parameters, a loss): pmap's copy on device 0."""
        if self.mode is Mode.PMAP:
            return jax.tree.map(lambda x: x[0], tree)
        return tree
