"""MAGI-1 4.5B-distill, teacache policy, threshold 0.01, reference semantics."""

from experiments.configs.magi_base import get_base


def get_config():
    return get_base("magi_teacache_slow", "teacache", 0.01, "reference")
