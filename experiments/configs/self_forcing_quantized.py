"""Self-Forcing (causal Wan2.1-T2V-1.3B), vanilla steps; the history quantized with precision per token by
FlowCache's importance-redundancy score (``kv.tiers``; the rest one summary token per frame and head)."""

from experiments.configs.self_forcing_base import get_base


def get_config():
    c = get_base("self_forcing_quantized", "vanilla")
    c.kv.method = "ours"
    return c
