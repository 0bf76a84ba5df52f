"""What a run loads: the model + tokenizer and its SAEs, checked against the config.

Every failure is a `checks.UserError` naming the file, layer or width and what to do.
"""
from __future__ import annotations

from typing import Any, Callable

from mosaic_jax import models
from mosaic_jax.data import images
from mosaic_jax.models import paligemma
from mosaic_jax.models import loading as model_loading
from mosaic_jax import store
from mosaic_jax.checks import UserError
from mosaic_jax.sae import loading as sae_loading
from mosaic_jax.variants import SAEKey, parse_width


def model_layers(config) -> tuple[int, ...]:
    """Config layers -> model block indices (see config.model.layer_convention)."""
    shift = 1 if config.model.layer_convention == 'hf_hidden_states' else 0
    return tuple(int(l) - shift for l in config.layers)


def sae_grid(config) -> list[SAEKey]:
    """SAEs to run: config layers x widths minus sae.exclude ('layer:width')."""
    excluded = set(config.sae.exclude)
    return [SAEKey(int(l), str(w)) for l in config.layers for w in config.sae.widths
            if f'{l}:{w}' not in excluded]


def resolve_sae_source(template: str, layer: int, width: str) -> str:
    """Fills {layer} and {width} of `config.sae.source` (a path or hub reference).

    Config files name shipped SAEs by absolute paths (configs/gemma3_270m.py resolves them
    next to itself), so nothing here depends on the source tree or the working directory.
    """
    return template.format(layer=layer, width=width)


def _each_sae(config, read: Callable[[str], Any], width_of: Callable[[Any], int]
              ) -> dict[SAEKey, Any]:
    """SAEKey -> read(source) for every SAE of the grid, its width checked against its name;
    any failure is one UserError naming the layer, width and source."""
    out = {}
    for key in sae_grid(config):
        src = resolve_sae_source(config.sae.source, key.layer, key.width)
        try:
            expected = parse_width(key.width)
            got = read(src)
        except (ValueError, FileNotFoundError, OSError) as e:
            raise UserError(f'SAE for layer {key.layer} width {key.width} ({src}): {e}') from e
        if width_of(got) != expected:
            raise UserError(f'SAE {src} has width {width_of(got)}, but the config names it '
                            f'{key.width} ({expected})')
        out[key] = got
    return out


def check_saes(config) -> None:
    """Every SAE of the grid exists and its width matches its name: read from headers
    (sae_loading.peek), before the model or any weights load."""
    _each_sae(config, sae_loading.peek, lambda shape: shape[1])


def load_saes(config, d_model: int) -> dict[SAEKey, Any]:
    """SAEKey -> SAEParams for every SAE of the grid; width checked against its name."""
    return _each_sae(config, lambda src: sae_loading.load_sae(src, d_model=d_model),
                     lambda params: params.width)


def model_fingerprint(config) -> list:
    """What identifies the model's numbers for the feature store: its files (name, size,
    mtime), dtype and matmul precision."""
    try:
        _, path = model_loading.resolve(config.model.path)
    except (ValueError, FileNotFoundError, OSError):
        path = config.model.path
    return [store.path_fingerprint(path), config.model.dtype, config.model.matmul_precision]


def sae_fingerprints(config) -> dict[SAEKey, list]:
    """SAEKey -> the files (or hub reference) of that SAE, for the feature store."""
    return {key: store.path_fingerprint(resolve_sae_source(config.sae.source, key.layer,
                                                           key.width))
            for key in sae_grid(config)}


def load_model(config):
    """(Transformer or PaliGemma, tokenizer) of config.model.path; layers checked against
    its depth, image datasets ('images:...') against its kind."""
    try:
        model = models.load_model(config.model.path, dtype=config.model.dtype)
        tokenizer = models.load_tokenizer(config.model.path)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise UserError(f'cannot load model {config.model.path!r}: {e}') from e
    n_blocks = model.config.num_layers
    bad = [l for l in model_layers(config) if not 0 <= l < n_blocks]
    if bad:
        raise UserError(f'layers {tuple(config.layers)} ({config.model.layer_convention}) '
                        f'reach blocks {bad}, but {config.model.path} has {n_blocks} blocks')
    imgs = [n for n in config.data.datasets if n.startswith(images.SPEC_PREFIX)]
    if imgs and not isinstance(model, paligemma.PaliGemma):
        raise UserError(f'dataset {imgs[0]!r} holds images, but {config.model.path!r} is a '
                        'text model; pass a PaliGemma 2 checkpoint folder (config.json '
                        "model_type 'paligemma') as --config.model.path")
    return model, tokenizer
