"""Synthetic flow, vanilla policy."""

from experiments.configs.synthetic_base import get_base


def get_config():
    return get_base("synthetic_vanilla", "vanilla", 0.0)
