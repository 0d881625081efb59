"""The one error type of bad input: raised before anything trains, reported in one line (exit code 2)."""


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the field."""
