"""Gemma-2 9B-it read with the base model's Gemma Scope SAEs (the paper's transfer setting:
SAEs trained on the pretrained model applied to the instruction-tuned one).

  python main.py --config=configs/gemma9b_it.py --config.model.path=/path/to/gemma-2-9b-it
"""
from configs import gemma9b


def get_config(arg=None):
    c = gemma9b.get_config(arg)
    c.model.name = 'google_gemma-2-9b-it'
    c.model.path = 'google/gemma-2-9b-it'
    return c
