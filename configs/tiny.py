"""A tiny random model and SAE that the tests write to disk; seconds on CPU.

  python main.py --config=configs/tiny.py --config.model.path=DIR \
      --config.sae.source=DIR/sae_layer_{layer} --config.workdir=/tmp/runs
"""
from configs import base


def get_config(arg=None):
    del arg
    c = base.get_config()
    c.model.name = 'tiny'
    c.model.path = ''  # the test passes --config.model.path
    c.model.max_length = 32
    c.model.batch_size = 16
    c.layers = (1, 2)
    c.sae.source = ''  # the test passes --config.sae.source
    c.sae.widths = ('128',)
    c.data.datasets = ('sae_probes:95_toxic_is',)
    c.data.max_rows = 200
    c.probe.Cs = (0.1, 1.0)
    c.probe.select = 'val'  # one fit per C keeps the suite fast; test_pipeline covers 'cv'
    c.compile_cache = ""  # tests share no on-disk state
    c.probe.max_iter = 100
    c.probe.fused_epochs = 2
    c.cv_folds = 2  # exercises MOSAIC's cross_validation block cheaply
    c.report = False
    return c
