"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class CapsrunError(Exception):
    """A problem with the user's input (config, files, checkpoint); the message says the fix."""


class ConfigError(CapsrunError):
    """A config value is out of range or of the wrong type."""


class DatasetError(CapsrunError):
    """A dataset file is missing, truncated or not in the expected format."""


class CheckpointError(CapsrunError):
    """A checkpoint is missing, unreadable or not a capsrun checkpoint."""
