"""The offline real model: Gemma 3 270M (pip-shipped GGUF) with our own JumpReLU SAEs.

Runs fully offline on real sae-probes datasets in a few minutes on 2 CPU cores:

  python main.py --config=configs/gemma3_270m.py
  python main.py --config=configs/gemma3_270m.py:smoke   # 200 rows of one dataset
"""
import os

from configs import base, common

# Shipped SAEs live in checkpoints/ beside configs/: resolved from this file, so a run
# works from any directory and with a non-editable install.
_CHECKPOINTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            'checkpoints')


def get_config(arg=None):
    arg = common.parse_arg(arg, smoke=False)
    c = base.get_config()
    c.model.name = 'google_gemma-3-270m'
    c.model.path = 'gemma3_270m'
    c.model.max_length = 128
    c.model.batch_size = 32
    # The paper's 2B layers 5/12/19 of 26 blocks, scaled to 18 blocks.
    c.layers = (3, 8, 13)
    # SAEs we trained on this model (checkpoints/, see their metadata.json).
    c.sae.source = os.path.join(_CHECKPOINTS, 'gemma3_270m', 'layer_{layer}_width_{width}')
    c.sae.widths = ('4k', '16k')
    c.sae.exclude = ('3:16k', '13:16k')  # the 16k width exists at the middle depth only
    # Two binary sets and the 4-class 102_twt_emotion.
    c.data.datasets = ('sae_probes:95_toxic_is', 'sae_probes:96_spam_is',
                       'sae_probes:102_twt_emotion')
    c.data.max_rows = 500  # demo timing in the README
    c.features.top_n = (20,)  # MOSAIC's top-n count pooling (its sweep used 0, 20 and 50)
    if arg.smoke:
        c.layers = (8,)
        c.sae.widths = ('4k',)
        c.sae.exclude = ()
        c.data.datasets = ('sae_probes:95_toxic_is',)
        c.data.max_rows = 200
        c.probe.Cs = (1.0,)
    return c
