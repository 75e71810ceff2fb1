"""SkyReels-V2 DF-1.3B-540P, teacache policy, threshold 0.1."""

from experiments.configs.skyreels_base import get_base


def get_config():
    return get_base("skyreels_teacache_slow", "teacache", 0.1)
