"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


def brief(e: BaseException) -> str:
    """An exception as a short single line, to embed in a one-line error message."""
    return " ".join(str(e).split())[:160] or type(e).__name__


class CapsrunError(Exception):
    """A problem with the user's input (config, files, checkpoint); the message says the fix."""


class ConfigError(CapsrunError):
    """A config value is out of range or of the wrong type."""


class DatasetError(CapsrunError):
    """A dataset file is missing, truncated or not in the expected format."""


class CheckpointError(CapsrunError):
    """A checkpoint is missing, unreadable or not a capsrun checkpoint."""
