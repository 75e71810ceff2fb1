"""Tiny MAGI-1 (trained here, shipped): TeaCache's one decision per step for the whole window, fast."""

from experiments.configs.tiny_base import get_base


def get_config():
    return get_base("tiny_teacache_fast", "teacache", 0.1)
