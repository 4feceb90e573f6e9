"""Derived catalog tables that analyses write (generation errors, binding pairs, object regions,
supernodes), and the one way they are created and replaced.

These tables are declared in :mod:`atlas.store.schema` like every other table. An atlas created
before they existed lacks them: :func:`ensure_derived_tables` creates them (``CREATE TABLE IF NOT
EXISTS``, idempotent), together with the graph catalog table the analyses read, so every named
query of the library can run on such an atlas once an analysis step has touched it. No torch here.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from atlas.store.catalog import connect, refresh_views, transaction
from atlas.store.schema import TABLES

#: Catalog tables written by analysis steps (plus ``graphs``, which `atlas trace` creates lazily).
DERIVED_TABLES = ("generation_errors", "binding_pairs", "object_regions", "supernodes")


def ensure_derived_tables(con: duckdb.DuckDBPyConnection, atlas_dir: str | Path) -> None:
    """Create the derived tables (and ``graphs``) in an open, writable catalog if missing; refresh views.

    Args:
        con: a writable connection from :func:`atlas.store.catalog.connect`.
        atlas_dir: the atlas folder (for the views over Parquet facts).
    """
    for name in ("graphs", *DERIVED_TABLES):
        con.execute(TABLES[name].ddl())
    refresh_views(con, atlas_dir)


def prepare_atlas(atlas_dir: str | Path) -> None:
    """Open ``atlas_dir`` writable once and :func:`ensure_derived_tables` (raises AtlasError if not an atlas)."""
    with connect(atlas_dir) as con:
        ensure_derived_tables(con, atlas_dir)


def replace_rows(atlas_dir: str | Path, table: str, where: str, params: list, rows) -> int:
    """In one transaction, delete the rows of ``table`` matching ``where`` (bound ``params``) and insert ``rows``.

    Args:
        table: one of :data:`DERIVED_TABLES`. where: a SQL condition with ``?`` placeholders, written
            by this package (never user text); params: its values. rows: a list of dicts or a
            polars DataFrame whose columns are a subset of the table's (bulk-inserted through Arrow).
    Returns:
        the number of rows inserted.
    Raises:
        KeyError: a row names a column the table does not have.
    """
    import polars as pl

    if table not in DERIVED_TABLES:
        raise ValueError(f"{table} is not a derived table ({', '.join(DERIVED_TABLES)})")
    names = TABLES[table].column_names
    frame = rows if isinstance(rows, pl.DataFrame) else pl.DataFrame(rows, infer_schema_length=None)
    unknown = set(frame.columns) - set(names)
    if unknown:
        raise KeyError(f"{table} has no column(s) {sorted(unknown)}; columns are {names}")
    cols = [n for n in names if n in frame.columns]
    with connect(atlas_dir) as con:
        ensure_derived_tables(con, atlas_dir)
        with transaction(con):
            con.execute(f"DELETE FROM {table} WHERE {where}", params)
            if len(frame):
                con.register("_derived_rows", frame.select(cols).to_arrow())
                try:
                    con.execute(f"INSERT INTO {table} ({', '.join(cols)}) SELECT {', '.join(cols)} FROM _derived_rows")
                finally:
                    con.unregister("_derived_rows")
    return len(frame)
