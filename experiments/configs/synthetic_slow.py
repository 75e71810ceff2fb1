"""Synthetic flow, flowcache policy, threshold 0.03."""

from experiments.configs.synthetic_base import get_base


def get_config():
    return get_base("synthetic_slow", "flowcache", 0.03)
