"""Trains the shipped JumpReLU SAEs of Gemma 3 270M (checkpoints/gemma3_270m/).

Two resumable phases, both safe to kill and rerun with the same flags:
  cache: one forward pass of the model over sae-probes training texts, writing the residual
         streams after blocks 3, 8 and 13 (BOS and padding excluded) as float32 .npy shards;
  train: one `sae_train.train_sae` run per SAE (orbax checkpoints under the workdir), then
         evaluation (L0, FVE, dead fraction, spliced next-token loss increase) and export
         with `sae_loading.save_sae` (bfloat16) to <out_dir>/layer_<L>_width_<W/1024>k/.

  nohup python scripts/train_saes.py --workdir=workdir/sae_gemma3_270m > sae.log 2>&1 &
"""
from __future__ import annotations

import dataclasses
import datetime
import glob
import os
import sys
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mosaic_jax import checkpoint  # noqa: E402
from mosaic_jax.data import batching
from mosaic_jax.data import loading as data_loading
from mosaic_jax.data import splits
from mosaic_jax.sae import loading as sae_loading
from mosaic_jax.sae import train as sae_train

MODEL = 'gemma3_270m'
# The paper's Gemma 2 2B layers 5/12/19 of 26 blocks, scaled to 18 blocks.
LAYERS = (3, 8, 13)
# (layer, width): 4k at every layer, 16k at the middle one (as configs/gemma3_270m.py reads).
SAES = ((8, 4096), (3, 4096), (13, 4096), (8, 16384))
# The demo datasets of configs/gemma3_270m.py are left out entirely, so no text the demo
# probes are evaluated on was ever seen by an SAE.
EXCLUDED = ('95_toxic_is', '96_spam_is', '102_twt_emotion')
SPLIT_SEED, FRACTIONS = 0, (0.7, 0.1, 0.2)  # configs/base.py: texts come from the train part
SHARD_TOKENS = 16_384

# Short-budget settings (see sae_train's docstring for the paper's): lr far above the
# paper's 7e-5 because we take 2k steps, not ~1M (pilot, layer 8 width 4k, 600 steps: lr 1e-3
# left L0 at 108 with held-out FVE 0.70, lr 3e-3 reached L0 64 with FVE 0.84); L0 steered to
# a target instead of a lambda sweep; b_dec starts at the data mean (the residual stream's
# mean carries ~93% of its squared norm); the learning rate decays over the final 20%.
# Per-dimension normalisation: dimension 163 of Gemma 3 270M's residual stream holds ~64% of
# the variance (layer 8), so with the paper's single scalar the SAE spends itself on it. Same
# pilot, 2000 steps: scalar -> FVE 0.89 but 0.60 outside dim 163, 67% dead latents, spliced
# loss +2.05 nats; per_dim -> FVE 0.89, 0.81 outside dim 163, 0% dead, +0.32 nats.
BASE = dict(steps=2000, batch_size=512, lr=3e-3, target_l0=64.0, l0_coeff=1.0,
            lr_warmup_frac=0.05, lr_decay_frac=0.2, l0_warmup_frac=0.1, b_dec_init='mean',
            normalise='per_dim', checkpoint_every=250)

_WORKDIR = flags.DEFINE_string('workdir', 'workdir/sae_gemma3_270m', 'cache + checkpoints')
_OUT = flags.DEFINE_string('out_dir', 'checkpoints/gemma3_270m', 'final SAE folders')
_PHASE = flags.DEFINE_enum('phase', 'all', ['cache', 'train', 'all'], 'what to run')
_TRAIN_TOKENS = flags.DEFINE_integer('train_tokens', 250_000, 'cached training tokens')
_EVAL_TOKENS = flags.DEFINE_integer('eval_tokens', 20_000, 'cached held-out tokens')
_MAX_LENGTH = flags.DEFINE_integer('max_length', 128, 'tokens per text (BOS included)')
_TEXTS_PER_DATASET = flags.DEFINE_integer('texts_per_dataset', 120, 'cap per dataset')
_BATCH = flags.DEFINE_integer('forward_batch', 16, 'texts per forward pass')
_SPLICE_TEXTS = flags.DEFINE_integer('splice_texts', 64, 'held-out texts for delta loss')
_ONLY = flags.DEFINE_list('only', [], 'subset of SAEs as layer:width, e.g. 8:4096')
_STEPS = flags.DEFINE_integer('steps', BASE['steps'], 'optimiser steps per SAE')


# ---------------------------------------------------------------------------------------
# Texts.
# ---------------------------------------------------------------------------------------
def select_texts(tokenizer) -> dict:
    """Round-robin over datasets' training splits until the token budgets are met.

    Returns {'train': [ids...], 'eval': [ids...], 'counts': {dataset: {train, eval}},
    'skipped': {dataset: reason}}; 'eval' texts are distinct from 'train' texts.
    """
    per_dataset, skipped = {}, {}
    for name in data_loading.sae_probes_names():
        if name in EXCLUDED:
            skipped[name] = 'demo dataset (probe evaluation data)'
            continue
        try:
            ds = data_loading.load(f'{data_loading.SAE_PROBES_PREFIX}{name}')
            train_idx, _, _ = splits.split(ds.labels, SPLIT_SEED, FRACTIONS)
        except ValueError as e:  # continuous targets, one-class sets: no probe split
            skipped[name] = str(e).split(';')[0][:120]
            continue
        rng = np.random.default_rng(SPLIT_SEED)
        pick = rng.permutation(train_idx)[:_TEXTS_PER_DATASET.value]
        per_dataset[name] = [ds.texts[i] for i in pick]
    names = sorted(per_dataset)
    order = [(n, i) for i in range(_TEXTS_PER_DATASET.value) for n in names
             if i < len(per_dataset[n])]
    ids, _ = batching.tokenize([per_dataset[n][i] for n, i in order], tokenizer,
                               _MAX_LENGTH.value)
    out = dict(train=[], eval=[], counts={}, skipped=skipped)
    budgets = dict(train=_TRAIN_TOKENS.value, eval=_EVAL_TOKENS.value)
    split, used = 'train', 0
    for (name, _), row in zip(order, ids):
        if len(row) < 2:
            continue
        out[split].append(row)
        out['counts'].setdefault(name, dict(train=0, eval=0))[split] += 1
        used += len(row) - 1  # BOS is never cached
        if used >= budgets[split]:
            if split == 'eval':
                break
            split, used = 'eval', 0
    return out


# ---------------------------------------------------------------------------------------
# Phase 1: activation cache.
# ---------------------------------------------------------------------------------------
def _residual_fn(model):
    from flax import nnx
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, mask):
        return nnx.merge(graphdef, state).residuals(ids, mask, LAYERS)  # [3, B, L, D]
    return lambda ids, mask: run(state, ids, mask)


def cache_split(model, tokenizer, rows: list, folder: str) -> int:
    """Writes layer_<L>/shard_<k>.npy for every layer; returns the tokens cached.

    Progress is recorded after every shard, so a rerun skips finished batches.
    """
    progress_path = os.path.join(folder, 'progress.json')
    progress = (checkpoint.read_json(progress_path) if os.path.exists(progress_path)
                else dict(batches=0, shards=0, tokens=0, done=False))
    if progress['done']:
        return progress['tokens']
    residuals = _residual_fn(model)
    buf = {layer: [] for layer in LAYERS}
    buffered = 0
    batches = list(batching.batches(rows, _BATCH.value, pad_id=tokenizer.pad_token_id,
                                    bucket_sizes=(32, 64, 128, 256)))
    t0 = time.time()
    for b, batch in enumerate(batches):
        if b < progress['batches']:
            continue
        res = np.asarray(residuals(batch.input_ids, batch.attention_mask))  # [3, B, L, D]
        keep = batch.attention_mask.astype(bool) & batch.valid[:, None]
        keep[:, 0] = False  # right padding: position 0 is BOS (huge norm, never trained on)
        for j, layer in enumerate(LAYERS):
            buf[layer].append(res[j][keep])
        buffered += int(keep.sum())
        last = b == len(batches) - 1
        if buffered >= SHARD_TOKENS or last:
            for layer in LAYERS:
                path = os.path.join(folder, f'layer_{layer}', f'shard_{progress["shards"]:05d}.npy')
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = path + '.tmp.npy'
                np.save(tmp, np.concatenate(buf[layer]).astype(np.float32))
                os.replace(tmp, path)
                buf[layer] = []
            progress = dict(batches=b + 1, shards=progress['shards'] + 1,
                            tokens=progress['tokens'] + buffered, done=last)
            checkpoint.atomic_write_json(progress_path, progress)
            logging.info('%s: %d/%d batches, %d tokens (%.0f tokens/s)', folder, b + 1,
                         len(batches), progress['tokens'], buffered / (time.time() - t0))
            buffered, t0 = 0, time.time()
    return progress['tokens']


def load_acts(folder: str, layer: int) -> np.ndarray:
    shards = sorted(glob.glob(os.path.join(folder, f'layer_{layer}', 'shard_*[0-9].npy')))
    if not shards:
        raise FileNotFoundError(f'no cached activations in {folder}/layer_{layer}')
    return np.concatenate([np.load(s) for s in shards])


# ---------------------------------------------------------------------------------------
# Phase 2: training, evaluation, export.
# ---------------------------------------------------------------------------------------
def train_one(layer: int, width: int, workdir: str, manifest: dict, model) -> dict:
    # Gemma Scope's width names ('4k', '16k'), as configs/gemma3_270m.py fills {width}.
    name = f'layer_{layer}_width_{width // 1024}k'
    out = os.path.join(_OUT.value, name)
    if os.path.exists(os.path.join(out, 'metadata.json')):
        logging.info('%s already exported, skipping', out)
        return checkpoint.read_json(os.path.join(out, 'metadata.json'))
    cfg = sae_train.TrainConfig(**dict(BASE, width=width, steps=_STEPS.value))
    acts = load_acts(os.path.join(workdir, 'acts', 'train'), layer)
    d_model = acts.shape[1]
    params, history = sae_train.train_sae(acts, d_model, cfg,
                                          checkpoint_dir=os.path.join(workdir, 'train', name),
                                          log_every=50)
    del acts
    if len(history.get('step', [])) == 0 or history['step'][-1] < cfg.steps:
        raise RuntimeError(f'{name} stopped before step {cfg.steps}')
    # Evaluate exactly what ships: the bfloat16-rounded params (saved losslessly below).
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), params)
    ev = sae_train.evaluate(params, load_acts(os.path.join(workdir, 'acts', 'eval'), layer))
    rows = manifest['splice_rows']
    ids = np.zeros((len(rows), max(map(len, rows))), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    spliced = sae_train.spliced_loss_increase(model, params, layer, ids, mask, batch_size=8)
    meta = dict(
        model=MODEL, layer=layer, layer_convention='gemma_scope (residual after block L)',
        width=width, d_model=d_model, hook='resid_post',
        training_tokens=int(cfg.steps * cfg.batch_size),
        distinct_training_tokens=manifest['train_tokens'],
        texts=dict(source='sae-probes cleaned_data, training split (seed 0, 0.7/0.1/0.2)',
                   train_counts={k: v['train'] for k, v in manifest['counts'].items()},
                   eval_counts={k: v['eval'] for k, v in manifest['counts'].items()
                                if v['eval']},
                   excluded=manifest['skipped'], max_length=_MAX_LENGTH.value,
                   bos_and_padding='excluded'),
        eval=dict(tokens=manifest['eval_tokens'], **ev), l0=ev['l0'], fve=ev['fve'],
        dead_fraction=ev['dead_fraction'], mse=ev['mse'],
        loss_increase=spliced['loss_increase'], clean_loss=spliced['clean_loss'],
        spliced_loss=spliced['spliced_loss'], splice_tokens=spliced['tokens'],
        final_train_metrics={k: float(v[-1]) for k, v in history.items()},
        normalisation='trained on (x - mean) / std per dimension, scaled to E||.||^2 = 1; '
                      'folded back into the params (sae_train.to_sae_params), so they take '
                      'raw residuals and have unit decoder rows',
        date=datetime.date.today().isoformat(), config=dataclasses.asdict(cfg),
        trainer='mosaic_jax.sae.train (JumpReLU, Gemma Scope recipe)')
    sae_loading.save_sae(out, params, meta, dtype='bfloat16')
    logging.info('%s: L0 %.1f FVE %.3f dead %.3f delta loss %.4f', name, ev['l0'], ev['fve'],
                 ev['dead_fraction'], spliced['loss_increase'])
    return meta


class _QuietOrbax:
    """Drops orbax's per-save INFO chatter (dozens of lines per checkpoint)."""

    def filter(self, record) -> bool:
        return record.levelno >= 30 or 'orbax' not in record.pathname


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(_QuietOrbax())
    from mosaic_jax import models
    workdir = _WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    tokenizer = models.load_tokenizer(MODEL)
    manifest_path = os.path.join(workdir, 'manifest.json')
    if os.path.exists(manifest_path):
        manifest = checkpoint.read_json(manifest_path)
    else:
        sel = select_texts(tokenizer)
        manifest = dict(train_rows=sel['train'], eval_rows=sel['eval'], counts=sel['counts'],
                        skipped=sel['skipped'],
                        splice_rows=sel['eval'][:_SPLICE_TEXTS.value],
                        train_tokens=sum(len(r) - 1 for r in sel['train']),
                        eval_tokens=sum(len(r) - 1 for r in sel['eval']))
        checkpoint.atomic_write_json(manifest_path, manifest)
    logging.info('texts: %d train (%d tokens), %d eval (%d tokens) from %d datasets',
                 len(manifest['train_rows']), manifest['train_tokens'],
                 len(manifest['eval_rows']), manifest['eval_tokens'], len(manifest['counts']))
    model = models.load_model(MODEL)
    if _PHASE.value in ('cache', 'all'):
        for split in ('eval', 'train'):
            cache_split(model, tokenizer, manifest[f'{split}_rows'],
                        os.path.join(workdir, 'acts', split))
    if _PHASE.value in ('train', 'all'):
        want = [s for s in SAES if not _ONLY.value or f'{s[0]}:{s[1]}' in _ONLY.value]
        for layer, width in want:
            train_one(layer, width, workdir, manifest, model)


if __name__ == '__main__':
    app.run(main)
