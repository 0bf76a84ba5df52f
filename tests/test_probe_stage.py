"""probe_stage's thread count: the configured one unless a dense variant is too large."""
import types

import numpy as np

from mosaic_jax.experiments import probe_stage


def _ctx(threads, widths):
    saes = {i: types.SimpleNamespace(width=w) for i, w in enumerate(widths)}
    return types.SimpleNamespace(config=types.SimpleNamespace(
        probe=types.SimpleNamespace(threads=threads)), saes=saes)


def _prep(n):
    return types.SimpleNamespace(ds=types.SimpleNamespace(labels=np.zeros(n, np.int32)))


def test_threads_follow_the_config_while_variants_are_small():
    assert probe_stage.threads(_ctx(2, (4096, 16384)), _prep(1000)) == 2
    assert probe_stage.threads(_ctx(3, ()), _prep(1000)) == 3  # no SAE: hidden only


def test_wide_variants_run_in_one_thread():
    # 4,000 x 16k float32 = 250 MiB and 1,000 x 65k = 250 MiB: over the 128 MiB bound.
    assert probe_stage.threads(_ctx(2, (16384,)), _prep(4000)) == 1
    assert probe_stage.threads(_ctx(2, (4096, 65536)), _prep(1000)) == 1
    n = probe_stage.MAX_THREADED_VARIANT_BYTES // (4 * 16384)
    assert probe_stage.threads(_ctx(2, (16384,)), _prep(n)) == 2       # exactly at the bound
    assert probe_stage.threads(_ctx(2, (16384,)), _prep(n + 1)) == 1
