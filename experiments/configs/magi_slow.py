"""MAGI-1 4.5B-distill, flowcache policy, threshold 0.01, reference semantics."""

from experiments.configs.magi_base import get_base


def get_config():
    return get_base("magi_slow", "flowcache", 0.01, "reference")
