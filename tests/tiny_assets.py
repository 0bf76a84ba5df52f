"""Tiny on-disk assets for pipeline tests: a tokenizer for a tiny model and SAE files."""
from __future__ import annotations

import os

import numpy as np


def save_tiny_tokenizer(folder: str, texts: list[str], vocab_size: int) -> None:
    """Trains a small BPE tokenizer on `texts` and saves it HF-style into `folder`.

    Ids 0..3 are <pad>, <eos>, <bos>, <unk> (Gemma's order); the model's vocab must be
    at least `vocab_size`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=['<pad>', '<eos>', '<bos>', '<unk>'],
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single='<bos> $A', pair='<bos> $A $B', special_tokens=[('<bos>', 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<bos>', eos_token='<eos>',
                                   pad_token='<pad>', unk_token='<unk>')
    fast.save_pretrained(folder)


def random_sae_arrays(d_model: int, width: int, seed: int) -> dict[str, np.ndarray]:
    """Random JumpReLU weights whose codes are neither all zero nor all active."""
    rng = np.random.default_rng(seed)
    w_enc = rng.normal(0, 1 / np.sqrt(d_model), (d_model, width)).astype(np.float32)
    return dict(W_enc=w_enc, W_dec=np.ascontiguousarray(w_enc.T),
                b_enc=rng.normal(0, 0.1, width).astype(np.float32),
                b_dec=np.zeros(d_model, np.float32),
                threshold=np.abs(rng.normal(0.3, 0.2, width)).astype(np.float32))


def save_gemma_scope_npz(folder: str, d_model: int, width: int, seed: int) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, 'params.npz')
    np.savez(path, **random_sae_arrays(d_model, width, seed))
    return path
