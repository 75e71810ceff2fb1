"""Tiny MAGI-1 (trained here, shipped): FirstBlockCache, chunkwise (first block residual vs last compute)."""

from experiments.configs.tiny_base import get_base


def get_config():
    return get_base("tiny_first_block", "first_block", 0.05)
