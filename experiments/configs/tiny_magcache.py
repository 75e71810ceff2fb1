"""Tiny MAGI-1 (trained here, shipped): MagCache, chunkwise (magnitude-ratio error model, calibrated)."""

from experiments.configs.tiny_base import get_base


def get_config():
    return get_base("tiny_magcache", "magcache", 0.1)
