"""MAGI-1 4.5B-distill, teacache policy, threshold 0.015, reference semantics."""

from experiments.configs.magi_base import get_base


def get_config():
    return get_base("magi_teacache_fast", "teacache", 0.015, "reference")
