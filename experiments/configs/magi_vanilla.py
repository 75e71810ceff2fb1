"""MAGI-1 4.5B-distill, vanilla policy, magi semantics."""

from experiments.configs.magi_base import get_base


def get_config():
    return get_base("magi_vanilla", "vanilla", 0.0, "magi")
