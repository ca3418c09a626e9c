"""Reading crystal structures (POSCAR, CIF, extended XYZ, JARVIS json) and validating them.

A screening run reads millions of inputs, so nothing here may stop it: `discover` walks the
inputs cheaply in the driver, `load` runs in workers and turns every problem into a `Failure`
whose reason says what is wrong. jarvis and scipy are imported where used, to keep this package
cheap to import in the driver and the CLI.
"""
from screener.io.elements import element_symbol
from screener.io.folders import discover
from screener.io.formats import FILE_TYPES, load
from screener.io.records import read_records, record_sources
from screener.io.structure import MAX_ATOMS, Failure, Source, Structure

__all__ = ["FILE_TYPES", "MAX_ATOMS", "Failure", "Source", "Structure", "discover",
           "element_symbol", "load", "read_records", "record_sources"]
