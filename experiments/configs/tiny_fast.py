"""Tiny MAGI-1 (trained here, shipped): FlowCache's chunkwise reuse, the fast threshold (the embedded default)."""

from experiments.configs.tiny_base import get_base


def get_config():
    return get_base("tiny_fast", "flowcache", 0.2)
