"""Errors specific to making shards (the shared ones live in diti_fast.data.errors)."""

from diti_fast.data.errors import DataError


class MissingFileError(DataError, FileNotFoundError):
    """A required input file (attribute table, partition list, image folder) does not exist."""
