"""Python API over an atlas: ad-hoc SQL and named queries, returned as polars DataFrames.

No torch here: an analyst can open an atlas on a laptop with duckdb + polars only.

    from atlas.query import Atlas
    atlas = Atlas("data/atlases/demo")
    atlas.query("top_features", k=5)                 # polars DataFrame
    atlas.sql("SELECT count(*) FROM activations WHERE layer = ?", [2])
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from atlas.query.library import QUERIES_DIR, NamedQuery, get_query, list_queries
from atlas.store.catalog import connect


class Atlas:
    """A read-only handle on an atlas folder.

    Every call opens the catalog read-only and closes it again, so an ingest can commit between
    calls. Raises :class:`atlas.store.catalog.AtlasError` if the folder is not an atlas of this
    schema version.
    """

    def __init__(self, path: str | Path, queries_dir: Path = QUERIES_DIR):
        self.path = Path(path)
        self.queries_dir = queries_dir
        with connect(self.path, read_only=True):
            pass  # fail early on a folder that is not an atlas

    def sql(self, query: str, params: list | dict | None = None) -> pl.DataFrame:
        """Run SQL with optional bound parameters (``?`` / ``$name``); returns a DataFrame."""
        with connect(self.path, read_only=True) as con:
            relation = con.sql(query, params=params)
            return relation.pl() if relation is not None else pl.DataFrame()

    def queries(self) -> dict[str, NamedQuery]:
        """The named queries of the SQL library, by name."""
        return list_queries(self.queries_dir)

    def query(self, name: str, **params) -> pl.DataFrame:
        """Run a named query of the library with its parameters (defaults from the file's header).

        Raises:
            QueryError: unknown query or parameter, or a value of the wrong type.
        """
        q = get_query(name, self.queries_dir)
        values = q.bind(params)
        with connect(self.path, read_only=True) as con:
            for key, value in values.items():
                # key is a header name (\w+, checked by the parser), quoted so reserved words such as
                # `order` or `limit` work; the value is bound.
                con.execute(f'SET VARIABLE "{key}" = ?', [value])
            return con.sql(q.sql).pl()
