"""Tiny MAGI-1 (trained here, shipped in the repo), every chunk computed at every step: the reference."""

from experiments.configs.tiny_base import get_base


def get_config():
    return get_base("tiny_vanilla", "vanilla")
