"""User-facing errors: the CLI prints each as one line and exits with status 2."""


class UserError(Exception):
    """A mistake in what the user gave us (config, data, paths); never a bug in samoe."""


class ConfigError(UserError):
    """A config value, key or file that cannot be used."""


class DataError(UserError):
    """A data path that is missing, empty, binary or not UTF-8 text."""


class CheckpointError(UserError):
    """A checkpoint or run directory that cannot be loaded or written."""
