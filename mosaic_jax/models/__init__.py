"""Gemma 2 / Gemma 3 text models in Flax NNX and their checkpoint loaders."""
from mosaic_jax.models.config import AttentionType, GemmaConfig
from mosaic_jax.models.loading import ModelNotFoundError, load_model, load_tokenizer
from mosaic_jax.models.transformer import Output, Transformer

__all__ = ['AttentionType', 'GemmaConfig', 'ModelNotFoundError', 'Output', 'Transformer',
           'load_model', 'load_tokenizer']
