"""label_correctness: the documented answer rules, and a toy QA run end to end."""
import csv

import pytest

from configs import tiny as tiny_config
from mosaic_jax.experiments import correctness
from mosaic_jax.experiments import experiment
from mosaic_jax.models import generate
from tests import test_pipeline


@pytest.mark.parametrize('generated,answer,ok', [
    (' 7\nQ: What is', '7', True),
    ('7.', '7', True),
    (' -3', '-3', True),
    (' 3', '-3', False),
    (' The Paris', 'paris', True),
    ('  seventy', '70', False),
    ('', '7', False),
])
def test_exact_rule(generated, answer, ok):
    assert correctness.is_correct(generated, answer, 'exact') is ok


@pytest.mark.parametrize('generated,answer,ok', [
    (' B) because', 'B', True), (' (C)', 'c', True), (' A', 'B', False),
    (' I think D', 'D', True), (' none', 'A', False)])
def test_choice_rule(generated, answer, ok):
    assert correctness.is_correct(generated, answer, 'choice') is ok


def test_arithmetic_questions_are_seeded_and_right():
    p, a = correctness.arithmetic_questions(20, seed=3)
    assert (p, a) == correctness.arithmetic_questions(20, seed=3)
    for prompt, ans in zip(p, a):
        q = prompt.rsplit('Q: What is ', 1)[1].split('?')[0]
        assert str(eval(q)) == ans  # noqa: S307 (digits and one operator we wrote)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return test_pipeline._build(str(tmp_path_factory.mktemp('tiny_qa')))


def _config(tiny, tmp_path, **correct):
    c = tiny_config.get_config()
    c.mode = 'label_correctness'
    c.model.path = tiny['model_dir']
    c.workdir = str(tmp_path)
    c.run_id = 'qa'
    c.parallel.mode = 'single'
    c.correctness.update(correct)
    return c


def test_toy_qa_file_gives_the_expected_labels(tiny, tmp_path, monkeypatch):
    qa = tmp_path / 'qa.csv'
    with open(qa, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['question', 'answer'])
        w.writerows([('Capital of France?', 'Paris'), ('2 + 2?', '4'), ('Red or blue?', 'blue'),
                     ('Largest planet?', 'Jupiter')])
    canned = {'Capital of France?': ' paris.\nnext', '2 + 2?': ' 5', 'Red or blue?': ' Blue',
              'Largest planet?': ' the Jupiter'}
    monkeypatch.setattr(generate, 'generate_text',
                        lambda model, tok, prompts, n: [canned[p] for p in prompts])
    experiment.run(_config(tiny, tmp_path, source=str(qa), n=0))
    rows = list(csv.DictReader(open(tmp_path / 'tiny' / '_runs' / 'qa' / 'correctness.csv')))
    got = {r['prompt']: r['target'] for r in rows}
    assert got == {'Capital of France?': '1', '2 + 2?': '0', 'Red or blue?': '1',
                   'Largest planet?': '1'}


def test_builtin_arithmetic_decodes_with_the_model(tiny, tmp_path):
    experiment.run(_config(tiny, tmp_path, n=8, max_new_tokens=3, batch_size=4))
    rows = list(csv.DictReader(open(tmp_path / 'tiny' / '_runs' / 'qa' / 'correctness.csv')))
    assert len(rows) == 8
    for r in rows:  # the rule applied to what the model really generated
        assert r['target'] == str(int(correctness.is_correct(r['generated'], r['answer'],
                                                             'exact')))
