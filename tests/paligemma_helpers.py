"""Tiny random transformers PaliGemma 2 checkpoints for tests (torch is test-only).

SigLIP tower 28 px / 7 px patches (P = 16 image tokens), width 32, 2 layers; Gemma 2
decoder width 32, 4 blocks, window 6 (shorter than the 16-token image prefix, so the
prefix mask visibly overrides it), both soft caps. Norm weights are made nonzero and the
decoder is drawn at std 0.2, as in helpers.py, so every piece matters.
"""
from __future__ import annotations

import os

import numpy as np

VOCAB = 96
IMAGE_TOKEN = 95   # inside the table, as in PaliGemma 2 (257152 of 257216)
BOS = 2
IMAGE_SIZE = 28
NUM_IMAGE_TOKENS = 16


def tiny_paligemma_config(**text_overrides):
    from transformers import PaliGemmaConfig
    text = dict(model_type='gemma2', vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                query_pre_attn_scalar=24, sliding_window=6, attn_logit_softcapping=5.0,
                final_logit_softcapping=3.0, initializer_range=0.2, pad_token_id=0,
                bos_token_id=BOS, eos_token_id=1)
    text.update(text_overrides)
    vision = dict(model_type='siglip_vision_model', hidden_size=32, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE,
                  patch_size=7, vision_use_head=False)
    cfg = PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN,
                          projection_dim=32, vocab_size=VOCAB)
    cfg._attn_implementation = 'eager'
    cfg.text_config._attn_implementation = 'eager'
    cfg.vision_config._attn_implementation = 'eager'
    return cfg


def tiny_paligemma(seed: int = 0, **text_overrides):
    """A float32 eval-mode PaliGemmaForConditionalGeneration with random weights."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(tiny_paligemma_config(**text_overrides))
    model = model.float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'norm' in name and 'language_model' in name:  # Gemma: stored as w, used as 1 + w
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            elif 'norm' in name and name.endswith('weight'):   # LayerNorm scale around 1
                p.copy_(1 + torch.randn(p.shape, generator=gen) * 0.3)
            elif name.endswith('bias'):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def tiny_paligemma_dir(tmp_path, seed: int = 0, **text_overrides) -> str:
    folder = os.path.join(tmp_path, 'tiny_paligemma')
    tiny_paligemma(seed, **text_overrides).save_pretrained(folder)
    return folder


def image_batch(lengths, suffixes, seq_len: int, seed: int = 0):
    """Left-padded PaliGemma rows: <image> x P, BOS, prompt (lengths[b] - 1 tokens incl.
    the newline), then suffixes[b] suffix tokens.

    Returns:
      ids int32[B, seq_len], mask int32[B, seq_len], token_type_ids int32[B, seq_len] (1 on
      the suffix), pixel_values float32[B, 3, S, S] in [-1, 1].
    """
    rng = np.random.default_rng(seed)
    b = len(lengths)
    ids = np.zeros((b, seq_len), np.int32)
    mask = np.zeros_like(ids)
    types = np.zeros_like(ids)
    for r, (n, s) in enumerate(zip(lengths, suffixes)):
        text = rng.integers(3, IMAGE_TOKEN, n + s)
        text[0] = BOS
        row = np.concatenate([np.full(NUM_IMAGE_TOKENS, IMAGE_TOKEN), text])
        ids[r, seq_len - len(row):] = row
        mask[r, seq_len - len(row):] = 1
        if s:
            types[r, seq_len - s:] = 1
    pixels = rng.uniform(-1, 1, (b, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    return ids, mask, types, pixels


def hf_reference(model, ids, mask, types, pixels):
    """transformers' outputs with cumsum positions (1-based, exact under left padding).

    Returns:
      (hidden_states list of float32[B, L, D] (0 = embeddings, last final-normed),
       tower last_hidden_state float32[B, P, D_v], projected features float32[B, P, D]).
    """
    import torch
    positions = np.cumsum(mask, axis=-1)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long),
                    token_type_ids=torch.tensor(types, dtype=torch.long),
                    position_ids=torch.tensor(positions, dtype=torch.long),
                    pixel_values=torch.tensor(pixels), output_hidden_states=True)
        img = model.model.get_image_features(torch.tensor(pixels))
    return ([h.float().numpy() for h in out.hidden_states],
            img.last_hidden_state.float().numpy(), img.pooler_output.float().numpy())
