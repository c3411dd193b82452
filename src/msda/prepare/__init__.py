"""Samples from real sources: ISMN stations (more sources follow: SMAP L3, rasters, Earth Engine).

``msda prepare ...`` on the command line; the same functions here for Python.
"""

from msda.prepare.ismn import IsmnTables, PrepareError, read_ismn, write_ismn

__all__ = ["IsmnTables", "PrepareError", "read_ismn", "write_ismn"]
