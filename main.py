"""mosaic_jax entry point, same as the `mosaic-jax` console script (mosaic_jax/cli.py).

  python main.py --config=configs/gemma3_270m.py
  python main.py --config=configs/gemma2b.py --config.model.path=/data/gemma-2-2b
"""
from mosaic_jax import cli

if __name__ == '__main__':
    cli.run()
