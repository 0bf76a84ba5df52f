"""The paper's claims checked on the offline real model (Gemma 3 270M + our SAEs).

Six sae-probes datasets (two multiclass), duplicate-safe splits, 95% intervals:

  python main.py --config=configs/claims.py --config.workdir=runs/claims --config.run_id=claims
  python -m mosaic_jax.experiments.claims --workdir=runs/claims --run_id=claims   # -> docs/claims.md
"""
from configs import gemma3_270m


def get_config(arg=None):
    c = gemma3_270m.get_config(arg)
    c.model.name = 'google_gemma-3-270m'
    c.data.datasets = ('sae_probes:106_hate_hate', 'sae_probes:113_movie_sent',
                       'sae_probes:105_click_bait', 'sae_probes:96_spam_is',
                       'sae_probes:102_twt_emotion', 'sae_probes:27_art_type')
    c.data.max_rows = 600  # ~10 minutes on 2 CPU cores for the whole table
    c.features.pooling = ('mosaic', 'mean', 'max')
    c.features.top_n = (20,)
    c.probe.Cs = (0.1, 1.0)
    c.probe.sparse_k = (5, 16)  # feature selection, the thing binarization would replace
    c.baselines = ('hidden_last', 'hidden_mean', 'tfidf')
    c.report = False
    return c
