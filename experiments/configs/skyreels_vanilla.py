"""SkyReels-V2 DF-1.3B-540P, vanilla policy."""

from experiments.configs.skyreels_base import get_base


def get_config():
    return get_base("skyreels_vanilla", "vanilla", 0.0)
