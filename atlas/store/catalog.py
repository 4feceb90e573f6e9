"""The atlas folder and its DuckDB catalog.

Layout of an atlas folder::

    atlas.duckdb                       catalog: small tables + views over the Parquet facts
    facts/<table>/run_id=R/layer=L/stream=S/batch-000012.parquet
    images/<run_id>/<prompt_id>.png

Views over Parquet use paths relative to the atlas folder, so the folder can be moved or
shared: open it from inside the folder with any DuckDB client (``cd ATLAS && duckdb
atlas.duckdb``), or through :func:`connect`, which points DuckDB's ``file_search_path`` at the
folder.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
from collections.abc import Iterator
from pathlib import Path

import duckdb

from atlas.store.schema import CATALOG_TABLES, FACT_TABLES, SCHEMA_VERSION, TABLES, Table

CATALOG_FILE = "atlas.duckdb"


class AtlasError(RuntimeError):
    """An atlas folder that cannot be used as asked (wrong schema version, not an atlas, ...)."""


def catalog_path(atlas_dir: str | Path) -> Path:
    return Path(atlas_dir) / CATALOG_FILE


def fact_glob(table: Table) -> str:
    """Relative glob of a fact table's committed Parquet files (temp files end in .tmp)."""
    return f"facts/{table.name}/**/*.parquet"


def _fact_view_sql(table: Table, atlas_dir: Path) -> str:
    """SQL of the view over a fact table; a typed empty relation while it has no files."""
    cols = ", ".join(f"CAST(NULL AS {t}) AS {n}" for n, t, _ in table.columns)
    if not any((atlas_dir / "facts" / table.name).rglob("*.parquet")):
        return f"CREATE OR REPLACE VIEW {table.name} AS SELECT {cols} WHERE false"
    hive_types = ", ".join(f"'{n}': {t}" for n, t, _ in table.columns if n in table.partition_by)
    names = ", ".join(f"f.{n}" for n in table.column_names)
    src = (
        f"read_parquet('{fact_glob(table)}', hive_partitioning = true, "
        f"hive_types = {{{hive_types}}}, union_by_name = true)"
    )
    sql = f"CREATE OR REPLACE VIEW {table.name} AS SELECT {names} FROM {src} AS f"
    if table.commit_log:
        log_table, keys = table.commit_log
        on = " AND ".join(f"f.{k} = c.{k}" for k in keys)
        sql += f" SEMI JOIN {log_table} AS c ON {on}"
    return sql


def refresh_views(con: duckdb.DuckDBPyConnection, atlas_dir: str | Path) -> None:
    """(Re)create the views over every fact table; call after files appear or disappear."""
    for table in FACT_TABLES:
        con.execute(_fact_view_sql(table, Path(atlas_dir)))


@contextlib.contextmanager
def connect(atlas_dir: str | Path, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open an existing atlas's catalog, with relative Parquet paths resolved in the atlas folder.

    Raises:
        AtlasError: the folder has no ``atlas.duckdb``, or it was written under another
            ``SCHEMA_VERSION``.
    """
    atlas_dir = Path(atlas_dir).resolve()
    path = catalog_path(atlas_dir)
    if not path.exists():
        raise AtlasError(f"{atlas_dir} is not an atlas (no {CATALOG_FILE}); create one with `atlas ingest`")
    con = duckdb.connect(str(path), read_only=read_only)
    try:
        con.execute("SET file_search_path = ?", [str(atlas_dir)])
        check_schema_version(con, atlas_dir)
        yield con
    finally:
        con.close()


def check_schema_version(con: duckdb.DuckDBPyConnection, atlas_dir: Path) -> None:
    """Raise AtlasError unless the catalog's schema_version equals ``SCHEMA_VERSION``."""
    try:
        rows = con.execute("SELECT value FROM atlas_meta WHERE key = 'schema_version'").fetchall()
    except duckdb.CatalogException:
        rows = []
    row = rows[0] if rows else None
    if row is None:
        raise AtlasError(f"{atlas_dir}/{CATALOG_FILE} has no atlas_meta table: not an atlas catalog")
    if int(row[0]) != SCHEMA_VERSION:
        raise AtlasError(
            f"{atlas_dir} was written with atlas schema version {row[0]}, this atlas version reads "
            f"schema version {SCHEMA_VERSION}. Nothing was changed; write to a new folder (--out) "
            "or open it with the atlas version that wrote it."
        )


def create_atlas(atlas_dir: str | Path) -> Path:
    """Create the folder and an empty catalog (all tables and views) if it does not exist yet.

    Idempotent on an atlas of the current schema version; raises AtlasError on another version
    or on a non-empty folder that is not an atlas (nothing in it is touched).
    """
    atlas_dir = Path(atlas_dir).resolve()
    path = catalog_path(atlas_dir)
    if not path.exists() and atlas_dir.exists() and any(atlas_dir.iterdir()):
        raise AtlasError(f"{atlas_dir} exists, is not empty and holds no {CATALOG_FILE}; choose another --out")
    atlas_dir.mkdir(parents=True, exist_ok=True)
    (atlas_dir / "facts").mkdir(exist_ok=True)
    (atlas_dir / "images").mkdir(exist_ok=True)
    fresh = not path.exists()
    con = duckdb.connect(str(path))
    try:
        con.execute("SET file_search_path = ?", [str(atlas_dir)])
        if fresh:
            with transaction(con):
                for table in CATALOG_TABLES:
                    con.execute(table.ddl())
                now = _dt.datetime.now(_dt.timezone.utc).isoformat()
                con.executemany(
                    "INSERT INTO atlas_meta VALUES (?, ?)",
                    [["schema_version", str(SCHEMA_VERSION)], ["created_at", now]],
                )
                refresh_views(con, atlas_dir)
        else:
            check_schema_version(con, atlas_dir)
    finally:
        con.close()
    return atlas_dir


@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """BEGIN/COMMIT around a block; ROLLBACK (and re-raise) if it fails."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def insert_rows(con: duckdb.DuckDBPyConnection, table: str, rows: list[dict]) -> None:
    """Insert dict rows into a catalog table, values bound as parameters (never pasted)."""
    if not rows:
        return
    names = TABLES[table].column_names
    unknown = set(rows[0]) - set(names)
    if unknown:
        raise KeyError(f"{table} has no column(s) {sorted(unknown)}; columns are {names}")
    cols = [n for n in names if n in rows[0]]
    sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})"
    con.executemany(sql, [[r[c] for c in cols] for r in rows])
