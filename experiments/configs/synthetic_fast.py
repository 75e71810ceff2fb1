"""Synthetic flow, flowcache policy, threshold 0.05."""

from experiments.configs.synthetic_base import get_base


def get_config():
    return get_base("synthetic_fast", "flowcache", 0.05)
