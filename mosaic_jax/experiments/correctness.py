"""`mode='label_correctness'`: which questions does a model (B) answer correctly?

The paper's cross-model transfer trains a probe on model A's features to predict whether
model B answers a question correctly. This mode produces those labels: greedy decoding
with our JAX Gemma (KV cache, batched, left-padded; models/generate.py) over a
question-answer set, then one rule per answer kind:
  * 'exact': the continuation's first line, normalised (casefold, punctuation and the
    articles a/an/the removed, whitespace collapsed), equals the normalised answer;
  * 'choice': the first standalone letter A-E of the continuation equals the answer letter.
It writes `<workdir>/<model>/_runs/<run_id>/correctness.csv` with columns
`prompt,target,answer,generated` (target 1 = correct), an ordinary local dataset for a
classify run on model A: `--config.data.datasets=('<that file>',)`.

`correctness.source='builtin:arithmetic'` builds a small real task offline: few-shot
single-digit additions and subtractions whose answers are known exactly.
"""
from __future__ import annotations

import os
import re
import string
import time

from absl import logging
import numpy as np

from mosaic_jax import results
from mosaic_jax.checks import UserError
from mosaic_jax.data import loading as data_loading
from mosaic_jax.experiments import assets
from mosaic_jax.models import generate

FIELDS = ('prompt', 'target', 'answer', 'generated')  # correctness.csv's columns

BUILTIN_ARITHMETIC = 'builtin:arithmetic'
# Single-digit operands: the 270M base model answers some and misses some, so both labels
# occur (with two-digit operands it answered 0 of 300).
_FEW_SHOT = ('Q: What is 2 + 3?\nA: 5\nQ: What is 9 - 4?\nA: 5\nQ: What is 6 + 2?\nA: 8\n'
             'Q: What is 7 - 7?\nA: 0\n')
_ARTICLES = re.compile(r'\b(a|an|the)\b')
_LETTER = re.compile(r'\b([A-E])\b')


def arithmetic_questions(n: int, seed: int) -> tuple[list[str], list[str]]:
    """n few-shot prompts 'Q: What is a ± b?\\nA:' (digits 0-9, never a negative result)
    and their exact answers (seeded)."""
    r = np.random.default_rng(seed)
    prompts, answers = [], []
    for _ in range(n):
        a, b = sorted((int(v) for v in r.integers(0, 10, size=2)), reverse=True)
        op = '+' if r.uniform() < 0.5 else '-'
        prompts.append(f'{_FEW_SHOT}Q: What is {a} {op} {b}?\nA:')
        answers.append(str(a + b if op == '+' else a - b))
    return prompts, answers


def normalise_answer(text: str) -> str:
    """The 'exact' rule's normal form of a first line (see module docstring)."""
    line = text.strip().split('\n', 1)[0].casefold()
    line = line.translate(str.maketrans('', '', string.punctuation.replace('-', '')))
    return ' '.join(_ARTICLES.sub(' ', line).split())


def is_correct(generated: str, answer: str, kind: str) -> bool:
    """The documented rule for one continuation ('exact' or 'choice')."""
    if kind == 'exact':
        return normalise_answer(generated) == normalise_answer(answer)
    if kind == 'choice':
        m = _LETTER.search(generated.strip())
        return bool(m) and m.group(1) == answer.strip().upper()[:1]
    raise ValueError(f"answer kind {kind!r}; valid: 'exact', 'choice'")


def _questions(config) -> tuple[list[str], list[str]]:
    c = config.correctness
    if c.source == BUILTIN_ARITHMETIC:
        return arithmetic_questions(int(c.n), int(config.seed))
    try:
        ds = data_loading.load(c.source, text_field=c.question_field, label_field=c.answer_field,
                               max_rows=int(c.n), seed=int(config.seed))
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise UserError(f'correctness.source {c.source!r}: {e}') from e
    return ds.texts, [ds.label_names[k] for k in ds.labels]


def label(config, run_folder: str) -> dict:
    """Greedy answers of config.model over the question set -> correctness.csv.

    Returns:
      {'path', 'n', 'n_correct', 'seconds'}.
    """
    c = config.correctness
    prompts, answers = _questions(config)
    model, tokenizer = assets.load_model(config)
    t0 = time.perf_counter()
    generated = []
    for s in range(0, len(prompts), int(c.batch_size)):
        generated += generate.generate_text(model, tokenizer, prompts[s:s + int(c.batch_size)],
                                            int(c.max_new_tokens))
    ok = [is_correct(g, a, c.answer_kind) for g, a in zip(generated, answers)]
    path = os.path.join(run_folder, 'correctness.csv')
    results.write_csv(path, [dict(prompt=p, target=int(y), answer=a, generated=g)
                             for p, y, a, g in zip(prompts, ok, answers, generated)], FIELDS)
    out = dict(path=path, n=len(ok), n_correct=int(sum(ok)),
               seconds=time.perf_counter() - t0)
    logging.info('label_correctness: %d of %d answered correctly (%.1fs); wrote %s',
                 out['n_correct'], out['n'], out['seconds'], path)
    print(f"correctness: {out['n_correct']} of {out['n']} correct -> {path}", flush=True)
    return out
