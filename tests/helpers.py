"""Tiny random transformers Gemma 2 / Gemma 3 checkpoints for tests (torch is test-only).

Weights are drawn larger than transformers' init (std 0.2 instead of 0.02) and the RMSNorm
weights are made nonzero, so that soft caps, norms and every projection visibly matter.
"""
from __future__ import annotations

import os

import numpy as np

VOCAB = 128
HIDDEN = 64


def tiny_gemma2_config(**overrides):
    """Gemma2Config: 4 blocks, 4 query / 2 KV heads of 16, window 8, both soft caps biting."""
    from transformers import Gemma2Config
    kw = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              query_pre_attn_scalar=24,  # != head_dim, so a head_dim-derived scale fails
              sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
              max_position_embeddings=256, initializer_range=0.2,
              attn_implementation='eager', pad_token_id=0, bos_token_id=2, eos_token_id=1)
    kw.update(overrides)
    return Gemma2Config(**kw)


def tiny_gemma3_config(**overrides):
    """Gemma3TextConfig: 5 mixed blocks, QK norm, window 6, separate local/global RoPE.

    Global layers use base 1e6 with linear scaling 2.0 (as Gemma 3 4B+ do with 8.0); local
    layers base 1e4. No soft caps, as in every Gemma 3.
    """
    from transformers import Gemma3TextConfig
    kw = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=5,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              query_pre_attn_scalar=24, sliding_window=6,
              layer_types=['sliding_attention', 'full_attention', 'sliding_attention',
                           'sliding_attention', 'full_attention'],
              rope_parameters={
                  'full_attention': {'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 1e6},
                  'sliding_attention': {'rope_type': 'default', 'rope_theta': 1e4}},
              max_position_embeddings=256, initializer_range=0.2,
              attn_implementation='eager', pad_token_id=0, bos_token_id=2, eos_token_id=1)
    kw.update(overrides)
    return Gemma3TextConfig(**kw)


def _randomize_norms(model, seed: int):
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'norm' in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def tiny_gemma2(seed: int = 0, **overrides):
    """A float32 eval-mode transformers Gemma2ForCausalLM with random weights."""
    import torch
    from transformers import Gemma2ForCausalLM
    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(tiny_gemma2_config(**overrides)).float().eval()
    _randomize_norms(model, seed)
    return model


def tiny_gemma3(seed: int = 0, **overrides):
    """A float32 eval-mode transformers Gemma3ForCausalLM with random weights."""
    import torch
    from transformers import Gemma3ForCausalLM
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(tiny_gemma3_config(**overrides)).float().eval()
    _randomize_norms(model, seed)
    return model


def save_model(model, folder, max_shard_size=None) -> str:
    """save_pretrained into folder (safetensors; sharded when max_shard_size is given)."""
    folder = os.fspath(folder)
    kw = {} if max_shard_size is None else {'max_shard_size': max_shard_size}
    model.save_pretrained(folder, **kw)
    return folder


def tiny_gemma2_dir(tmp_path, seed: int = 0, **overrides) -> str:
    """Writes a tiny random Gemma 2 checkpoint to tmp_path/'tiny_gemma2'; returns the folder."""
    return save_model(tiny_gemma2(seed, **overrides), os.path.join(tmp_path, 'tiny_gemma2'))


def tiny_gemma3_dir(tmp_path, seed: int = 0, **overrides) -> str:
    """Writes a tiny random Gemma 3 checkpoint to tmp_path/'tiny_gemma3'; returns the folder."""
    return save_model(tiny_gemma3(seed, **overrides), os.path.join(tmp_path, 'tiny_gemma3'))


def padded_batch(lengths, seq_len: int, side: str, seed: int = 0):
    """Random token ids and a 0/1 mask, each row `lengths[b]` real tokens padded on `side`.

    Returns:
      ids int32[B, seq_len] (pad id 0 where masked), mask int32[B, seq_len].
    """
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), seq_len), np.int32)
    mask = np.zeros((len(lengths), seq_len), np.int32)
    for b, n in enumerate(lengths):
        toks = rng.integers(3, VOCAB, n)
        toks[0] = 2  # <bos>, as a tokenizer would put it
        sl = slice(0, n) if side == 'right' else slice(seq_len - n, seq_len)
        ids[b, sl], mask[b, sl] = toks, 1
    return ids, mask


def hf_reference(model, ids, mask):
    """transformers' hidden states and logits with cumsum positions (exact left padding).

    Returns:
      (hidden_states: list of float32[B, L, D], index 0 = embeddings, last = final-normed;
       logits float32[B, L, V]).
    """
    import torch
    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(positions, dtype=torch.long),
                    output_hidden_states=True)
    return ([h.float().numpy() for h in out.hidden_states], out.logits.float().numpy())
