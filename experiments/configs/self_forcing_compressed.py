"""Self-Forcing (causal Wan2.1-T2V-1.3B), vanilla steps; FlowCache's KV compression of the history: each frame keeps
the top half of its tokens per head by the importance-redundancy score (stored INT8), the rest dropped."""

from experiments.configs.self_forcing_base import get_base


def get_config():
    c = get_base("self_forcing_compressed", "vanilla")
    c.kv.method = "ours"
    c.kv.tiers = ((8, 0.5),)
    c.kv.summary = False
    c.kv.aged_tiers = -1  # compression only: no frame is summarised later
    return c
