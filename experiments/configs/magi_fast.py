"""MAGI-1 4.5B-distill, flowcache policy, threshold 0.015, reference semantics."""

from experiments.configs.magi_base import get_base


def get_config():
    return get_base("magi_fast", "flowcache", 0.015, "reference")
