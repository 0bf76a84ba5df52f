"""Gemma 3 270M (pip-shipped GGUF) with Google's Gemma Scope 2 residual SAEs.

The SAEs are downloaded from the Hugging Face repo google/gemma-scope-2-270m-pt on first use
(then read from the HF cache); offline, download them elsewhere and pass the folder instead:

  python main.py --config=configs/gemma3_270m_scope2.py
  python main.py --config=configs/gemma3_270m_scope2.py:smoke   # one layer, 16k, 200 rows
  python main.py --config=configs/gemma3_270m_scope2.py \
      --config.sae.source=DIR/resid_post/layer_{layer}_width_{width}_l0_medium
"""
from configs import common, gemma3_270m

# Gemma Scope 2 for Gemma 3 270M PT (the GGUF's base model, google/gemma-3-270m), as listed in
# SAELens' pretrained_saes.yaml release gemma-scope-2-270m-pt-res: resid_post/ has layers
# 5, 9, 12, 15 (of 18 blocks), widths 16k, 65k, 262k, 1m, and l0 small / medium / big
# (medium: average L0 55 at layer 5, 60 elsewhere). The hook, model.layers.L.output, is the
# residual after block L: the gemma_scope layer convention. resid_post_all/ has every layer
# 0-17 at widths 16k and 262k with l0 small / big only.
SCOPE2_SOURCE = 'google/gemma-scope-2-270m-pt/resid_post/layer_{layer}_width_{width}_l0_medium'
SCOPE2_LAYERS = (5, 9, 12, 15)


def get_config(arg=None):
    arg = common.parse_arg(arg, smoke=False)
    c = gemma3_270m.get_config()  # the model, data and pooling of the offline demo
    c.layers = SCOPE2_LAYERS
    c.sae.source = SCOPE2_SOURCE
    # 262k and 1m also exist at these layers ('--config.sae.widths=...'), but their probes are
    # slow on CPU and a 1m SAE holds 2 x 640 x 2^20 float32 weights (5.4 GB).
    c.sae.widths = ('16k', '65k')
    c.sae.exclude = ()
    # Encode and pool 16k latents at a time, so a [B, T, 65k] code tensor never exists.
    c.sae.chunk_size = 16384
    if arg.smoke:
        c.layers = (9,)
        c.sae.widths = ('16k',)
        c.data.datasets = ('sae_probes:95_toxic_is',)
        c.data.max_rows = 200
        c.probe.Cs = (1.0,)
    return c
