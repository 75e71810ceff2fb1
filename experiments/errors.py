"""The error every experiment CLI reports as one line (no traceback): a bad config value or a bad input file."""


class ConfigError(ValueError):
    """A bad config value; reported as one line, never a traceback."""
