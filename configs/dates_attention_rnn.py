"""Dates -> ISO with the Bahdanau attention RNN (the same experiment as configs/default.py)."""

from configs import default


def get_config():
    return default.get_config()
