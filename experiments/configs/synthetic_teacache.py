"""Synthetic flow, teacache policy, threshold 0.03."""

from experiments.configs.synthetic_base import get_base


def get_config():
    return get_base("synthetic_teacache", "teacache", 0.03)
