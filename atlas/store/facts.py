"""Parquet fact files: atomic writes per batch, and clean-up of what a killed run left behind.

A batch's rows are written as one file per hive partition
(``facts/<table>/run_id=R/layer=L/stream=S/batch-000012.parquet``). Each file is first written
under a ``.tmp`` name and renamed, so no half-written Parquet file is ever visible; the batch
as a whole becomes visible only when its row lands in the catalog's ``batches`` table (the views
of tables with a ``commit_log`` semi-join on it). Files of batches that never committed are removed
by :func:`remove_uncommitted` before a run resumes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from atlas.store.schema import TABLES, Table


def partition_dir(atlas_dir: Path, table: Table, keys: dict) -> Path:
    """Folder of one hive partition, e.g. ``facts/activations/run_id=R/layer=3/stream=img``."""
    parts = [f"{k}={keys[k]}" for k in table.partition_by]
    return Path(atlas_dir) / "facts" / table.name / Path(*parts)


def batch_file_name(batch_id: int) -> str:
    return f"batch-{batch_id:06d}.parquet"


def write_atomic(table: pa.Table, path: Path) -> None:
    """Write a Parquet file under a temporary name, fsync it, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_partition(atlas_dir: Path, table_name: str, keys: dict, columns: dict, name: str) -> Path:
    """Write one partition file of a fact table.

    Args:
        keys: values of the table's ``partition_by`` columns (they go in the path).
        columns: the file's columns (everything else), as numpy arrays or lists, in any order;
            cast to the schema's types.
        name: file name inside the partition folder (e.g. :func:`batch_file_name`).

    Raises:
        KeyError: a column of the schema is missing, or an unknown one is given.
    """
    table = TABLES[table_name]
    schema = table.arrow_schema()
    missing = set(schema.names) - set(columns)
    extra = set(columns) - set(schema.names)
    if missing or extra:
        raise KeyError(f"{table_name}: missing columns {sorted(missing)}, unknown columns {sorted(extra)}")
    arrays = [pa.array(columns[f.name], type=f.type) for f in schema]
    out = partition_dir(atlas_dir, table, keys) / name
    write_atomic(pa.Table.from_arrays(arrays, schema=schema), out)
    return out


def remove_uncommitted(atlas_dir: Path, run_id: str, committed: set[int]) -> int:
    """Delete a run's ``.tmp`` files and batch files whose batch is not in ``committed``.

    Returns the number of files removed. Only ``batch-*.parquet`` names are considered, so
    derived files (e.g. top examples) are left alone.
    """
    removed = 0
    for table in TABLES.values():
        root = Path(atlas_dir) / "facts" / table.name / f"run_id={run_id}"
        if not root.exists():
            continue
        for f in root.rglob("*"):
            if not f.is_file():
                continue
            stale_tmp = f.name.endswith(".tmp")
            stale_batch = f.name.startswith("batch-") and f.suffix == ".parquet" and int(f.stem[6:]) not in committed
            if stale_tmp or stale_batch:
                f.unlink()
                removed += 1
    return removed
