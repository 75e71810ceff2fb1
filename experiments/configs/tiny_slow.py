"""Tiny MAGI-1 (trained here, shipped): FlowCache's chunkwise reuse, the conservative threshold."""

from experiments.configs.tiny_base import get_base


def get_config():
    return get_base("tiny_slow", "flowcache", 0.05)
