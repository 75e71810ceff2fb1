"""Self-Forcing (causal Wan2.1-T2V-1.3B), flowcache policy, threshold 0.1."""

from experiments.configs.self_forcing_base import get_base


def get_config():
    return get_base("self_forcing_fast", "flowcache", 0.1)
