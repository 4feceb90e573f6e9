"""Query stage: the SQL library (queries/*.sql) and a Python API returning polars DataFrames.

Imports no torch, so an atlas can be analysed on a machine with duckdb and polars only.
"""

from atlas.query.api import Atlas
from atlas.query.library import NamedQuery, Param, QueryError, get_query, list_queries

__all__ = ["Atlas", "NamedQuery", "Param", "QueryError", "get_query", "list_queries"]
