"""Error and warning types shared by the shard writer and the loader."""

from __future__ import annotations


class DataError(Exception):
    """Bad data input: the message names the file and, where it applies, the line or key."""


class DataFormatError(DataError):
    """A malformed input file (attribute table, CSV row, manifest)."""


class CorruptSampleError(DataError):
    """Raised for a corrupt or incomplete sample when the loader runs in strict mode."""


class DataWarning(UserWarning):
    """Recoverable data problems: skipped samples, uneven shard splits."""


class MissingFileError(DataError, FileNotFoundError):
    """A required input file (attribute table, partition list, image folder) does not exist."""
