"""SkyReels-V2 DF-1.3B-540P, flowcache policy, threshold 0.15."""

from experiments.configs.skyreels_base import get_base


def get_config():
    return get_base("skyreels_fast", "flowcache", 0.15)
