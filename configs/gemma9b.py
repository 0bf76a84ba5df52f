"""Gemma-2 9B with Gemma Scope 9b-pt-res SAEs (layers 9/20/31 of 42, width 16k).

  python main.py --config=configs/gemma9b.py --config.model.path=/path/to/gemma-2-9b
"""
from configs import base, common


def get_config(arg=None):
    arg = common.parse_arg(arg, smoke=False)
    c = base.get_config()
    c.model.name = 'google_gemma-2-9b'
    c.model.path = 'google/gemma-2-9b'
    c.model.dtype = 'bfloat16'  # 9B in float32 is 37 GB of weights
    c.model.batch_size = 8
    c.layers = (9, 20, 31)
    c.sae.source = 'google/gemma-scope-9b-pt-res/layer_{layer}/width_{width}/canonical'
    c.sae.widths = ('16k',)
    c.data.datasets = ('election_questions', 'reject_prompts', 'jailbreak_classification')
    c.cv_folds = 5  # MOSAIC's dashboards report 5-fold CV of the chosen probe
    if arg.smoke:
        c.layers = (20,)
        c.data.max_rows = 200
        c.probe.Cs = (1.0,)
    return c
