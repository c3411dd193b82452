"""Exception types: one per kind of user mistake, raised at the edge and printed by the CLI."""

from __future__ import annotations


class MsdaError(Exception):
    """Base class of every error a user can cause; the CLI prints it as one line."""


class SchemaError(MsdaError):
    """A feature schema file or object is malformed, or does not fit the data or weights."""


class TableError(MsdaError):
    """A sample table is missing columns, holds bad values, or cannot be read or written."""


class WeightsError(MsdaError):
    """A weights file or directory does not fit the model (keys, shapes, schema, format)."""
