"""SkyReels-V2 DF-1.3B-540P, teacache policy, threshold 0.2."""

from experiments.configs.skyreels_base import get_base


def get_config():
    return get_base("skyreels_teacache_fast", "teacache", 0.2)
