"""Self-Forcing (causal Wan2.1-T2V-1.3B), teacache policy, threshold 0.1."""

from experiments.configs.self_forcing_base import get_base


def get_config():
    return get_base("self_forcing_teacache", "teacache", 0.1)
