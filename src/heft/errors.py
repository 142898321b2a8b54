"""Errors that reach the user: each names the field or file, the bad value, and the fix."""


class HeftError(Exception):
    """Base class for every error heft raises on purpose (the CLI prints these without a traceback)."""


class ConfigError(HeftError):
    """A configuration value is unknown, of the wrong type, or out of range."""


class DataError(HeftError):
    """A data file or row is unusable; the message names the file, line and field."""


class AssetError(HeftError):
    """An offline asset (embedded model or data set) could not be fetched or verified."""


class CheckpointError(HeftError):
    """A run folder or adapter file is missing, corrupt, or does not match the base model."""
