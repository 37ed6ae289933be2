"""Error types whose messages are meant to be shown to a user as one line.

Every message names the file (or setting), the field, and what was expected, so the CLI can print
``error: <message>`` instead of a traceback.
"""


class FedFMSError(Exception):
    """Base class for problems a user can fix (bad input, bad configuration)."""


class DataError(FedFMSError, ValueError):
    """A dataset file or folder is missing, unreadable or inconsistent."""


class CheckpointError(FedFMSError, ValueError):
    """A SAM checkpoint is missing, truncated, or belongs to another variant."""


class ConfigError(FedFMSError, ValueError):
    """A configuration value is missing or out of range."""
