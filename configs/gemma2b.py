"""Gemma-2 2B with Gemma Scope residual SAEs (the paper's main setting).

  python main.py --config=configs/gemma2b.py --config.model.path=/path/to/gemma-2-2b
  python main.py --config=configs/gemma2b.py:smoke   # few rows, one layer, one width
"""
from configs import base, common


def get_config(arg=None):
    arg = common.parse_arg(arg, smoke=False)
    c = base.get_config()
    c.model.name = 'google_gemma-2-2b'
    c.model.path = 'google/gemma-2-2b'
    # Gemma Scope 2b-pt-res; the paper's layers 5/12/19 of 26 and widths 16k/65k.
    c.layers = (5, 12, 19)
    c.sae.source = 'google/gemma-scope-2b-pt-res/layer_{layer}/width_{width}/canonical'
    c.sae.widths = ('16k', '65k')
    c.sae.chunk_size = 16384  # a 65k encode of a 16x256 batch would be 4 GiB unchunked
    c.data.datasets = ('election_questions', 'reject_prompts', 'jailbreak_classification')
    c.cv_folds = 5  # MOSAIC's dashboards report 5-fold CV of the chosen probe
    if arg.smoke:
        c.layers = (12,)
        c.sae.widths = ('16k',)
        c.data.max_rows = 200
        c.probe.Cs = (1.0,)
    return c
