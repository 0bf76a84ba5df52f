"""One process of the two-process CPU job in test_pipeline (or the 1-process reference).

  python tests/multihost_worker.py MODEL_DIR SAE_FOLDER OUT_DIR PORT PROCESS_ID
PROCESS_ID -1 runs alone. Writes OUT_DIR/features_{mh,1p}.npz (process 0) and a results
workdir OUT_DIR/{mh,1p}/ through experiment.run.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')

from configs import tiny  # noqa: E402
from mosaic_jax import parallel, steps  # noqa: E402
from mosaic_jax.data import batching
from mosaic_jax.data import loading as data_loading
from mosaic_jax.experiments import assets
from mosaic_jax.experiments import experiment


def main(model_dir, folder, out, port, pid):
    tag = '1p' if pid < 0 else 'mh'
    c = tiny.get_config()
    c.model.path = model_dir
    c.sae.source = folder + '/sae_layer_{layer}'
    c.workdir = os.path.join(out, tag)
    c.run_id = tag
    c.parallel.mode = 'mesh'
    c.baselines = ('hidden_last',)
    if pid >= 0:
        c.parallel.distributed = True
        c.parallel.cpu_collectives = 'gloo'
        c.parallel.coordinator_address = f'127.0.0.1:{port}'
        c.parallel.num_processes = 2
        c.parallel.process_id = pid
    parallel.init_distributed(parallel.ProcessOptions.from_config(c))
    assert jax.device_count() == (4 if pid >= 0 else 1), jax.devices()

    model, tok = assets.load_model(c)
    saes = assets.load_saes(c, model.config.embed_dim)
    spec = steps.FeatureSpec.build(
        layers=tuple(c.layers), config_layers=tuple(c.layers), saes=saes,
        pooling=tuple(c.features.pooling), binarize=tuple(c.features.binarize),
        top_n=0, threshold=1.0, chunk_size=0, hidden=('last',))
    ds = data_loading.load(c.data.datasets[0], max_rows=c.data.max_rows, seed=c.seed)
    ids, _ = batching.tokenize(ds.texts, tok, c.model.max_length)
    devices = parallel.Devices('mesh')
    ex = steps.Extractor(model, saes, spec, devices)
    feats = steps.extract(ex, batching.batches(ids, 16, pad_id=tok.pad_token_id, multiple_of=4),
                          len(ids), bos_id=tok.bos_token_id, include_special=False,
                          progress=False)
    if jax.process_index() == 0:
        np.savez(os.path.join(out, f'features_{tag}.npz'),
                 **{k.full_name.replace('/', '__'): v for k, v in feats.items()})
    experiment.run(c)


if __name__ == '__main__':
    a = sys.argv[1:]
    main(a[0], a[1], a[2], int(a[3]), int(a[4]))
