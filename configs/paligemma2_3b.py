"""PaliGemma 2 3B (pt, 224 px) with Gemma Scope 2B residual SAEs: text-trained SAE features
read on image inputs (the paper's cross-modal study).

  python scripts/digits_to_folder.py /data/digits          # or any folder/<class>/<image>
  python main.py --config=configs/paligemma2_3b.py \
      --config.model.path=/path/to/paligemma2-3b-pt-224 \
      --config.data.datasets='("images:/data/digits",)'
  python main.py --config=configs/paligemma2_3b.py:smoke ...  # one layer, one width, 200 rows

Needs: the checkpoint folder (config.json, model*.safetensors, tokenizer files), the Gemma
Scope 2b-pt-res SAEs (hub cache or local folders) and an image folder, CSV/parquet table
('images:/data/table.csv') or hub dataset ('images:hub:<id>').
The fields under "cross-modal" are read by the image path of a run
(`mosaic_jax.experiments.image_run`).
"""
from configs import base, common


def get_config(arg=None):
    arg = common.parse_arg(arg, smoke=False)
    c = base.get_config()
    c.model.name = 'google_paligemma2-3b-pt-224'
    c.model.path = 'google/paligemma2-3b-pt-224'
    # 3B decoder + 400M tower: bf16 keeps it on one 24 GB accelerator.
    c.model.dtype = 'bfloat16'
    # The decoder is Gemma 2 2B's architecture, so Gemma Scope 2B's SAEs read it; the
    # paper's layers 5/12/19 of 26 (as configs/gemma2b.py) and width 16k.
    c.layers = (5, 12, 19)
    c.sae.source = 'google/gemma-scope-2b-pt-res/layer_{layer}/width_{width}/canonical'
    c.sae.widths = ('16k',)
    # 256 image tokens + prompt per row; 16 rows of 16k codes fit without chunking.
    c.model.batch_size = 16
    c.model.max_length = 300  # 256 image tokens + BOS + prompt + newline

    # ---- cross-modal
    # Text after the image, PaliGemma's task prefix ('caption en' is the pt models' own).
    c.data.prompt = 'caption en'
    # Which positions are pooled: 'image' (the 256 projected patches), 'prompt' (the text
    # after them, BOS left out unless features.include_special) or 'both'.
    c.features.positions = 'image'
    # Mean and max over 256 image tokens; MOSAIC's top-n counts are a text-length idea.
    c.features.pooling = ('mean', 'max')
    # Beside the SAE probes: the pooled hidden state and logistic regression on 8 x 8
    # downsampled pixels (how much is there before any model); no TF-IDF (no text).
    c.baselines = ('hidden_mean', 'pixels')
    c.features.pixel_side = 8
    # An image folder of class sub-folders (scripts/digits_to_folder.py writes one), a
    # table 'images:/data/t.csv' (columns data.image_field, data.label_field) or
    # 'images:hub:<id>'.
    c.data.datasets = ('images:digits',)
    c.data.label_field = 'label'
    c.data.image_field = 'image'
    if arg.smoke:
        c.layers = (12,)
        c.data.max_rows = 200
        c.probe.Cs = (1.0,)
    return c
