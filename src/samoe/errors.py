"""User-facing errors: the CLI prints each as one line and exits with status 2."""

EXIT_USER_ERROR = 2  # a UserError's exit status (one line on stderr)


class UserError(Exception):
    """A mistake in what the user gave us (config, data, paths); never a bug in samoe."""


class ConfigError(UserError):
    """A config value, key or file that cannot be used."""


class DataError(UserError):
    """A data path that is missing, empty, binary or not UTF-8 text."""


class CheckpointError(UserError):
    """A checkpoint or run directory that cannot be loaded or written."""


class ExportError(UserError):
    """A run that cannot be exported in the asked format, or an export or upcycling source that does not fit."""


class UpcycleError(UserError):
    """A `--init-from` source that is not a dense model or does not fit the new model's shapes."""
