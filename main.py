"""mosaic_jax entry point: parses the config and hands it to `experiment.run`.

  python main.py --config=configs/gemma3_270m.py
  python main.py --config=configs/gemma2b.py --config.model.path=/data/gemma-2-2b
  python main.py --config=configs/gemma3_270m.py --config.mode=report --config.workdir=runs

Kept short on purpose: all logic lives in mosaic_jax and is importable from tests.
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (configs/*.py).', lock_config=True)
flags.mark_flags_as_required(['config'])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    from mosaic_jax import experiment  # after flag parsing so --help stays fast

    try:
        experiment.run(_CONFIG.value)
    except experiment.UserError as e:  # bad input / missing weights: one clear line
        logging.error('%s', e)
        raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
    app.run(main)
