"""Corpus analyses that write derived tables into an atlas (`atlas analyze`), torch-free.

- :mod:`atlas.analysis.binding`: attribute-object pairs of two-object prompts located on the text
  stream (``binding_pairs``) and ground-truth object regions where a world provides them
  (``object_regions``), read by the ``attribute_binding`` and ``binding_features`` queries.
- :func:`write_supernodes`: candidate supernodes (``supernodes``) from the
  ``supernode_candidates`` query, grouped with networkx.

Generation errors (``generation_errors``) are written by :mod:`atlas.query.errors`
(`atlas label-errors`). Everything else is SQL: see ``queries/``.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path

from atlas.analysis.binding import write_binding_tables

__all__ = ["AnalyzeResult", "analyze", "write_binding_tables", "write_supernodes"]


def write_supernodes(atlas_dir: str | Path, run_id: str | None = None, min_similarity: float = 0.8,
                     min_shared_dims: int = 2, min_support: int = 2, max_features: int = 500,
                     same_layer: bool = True) -> int:
    """Group features into candidate supernodes (:func:`atlas.query.graphs.supernode_groups`) and
    replace the ``supernodes`` rows of the run (all runs if None). Returns the number of groups.
    supernode_id numbers a run's groups from 0 by total graphs, descending."""
    from atlas.query.derived import prepare_atlas, replace_rows
    from atlas.query.graphs import supernode_groups

    prepare_atlas(atlas_dir)
    params = dict(min_similarity=min_similarity, min_shared_dims=min_shared_dims, min_support=min_support,
                  max_features=max_features, same_layer=same_layer)
    groups = supernode_groups(atlas_dir, run_id=run_id, **params)
    method = "role-cosine components " + json.dumps(params, sort_keys=True)
    now = _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)
    rows, next_id = [], {}
    for grp in groups:
        sid = next_id.get(grp["run_id"], 0)
        next_id[grp["run_id"]] = sid + 1
        for m in grp["members"]:
            rows.append({"run_id": grp["run_id"], "supernode_id": sid, "layer": m[0], "stream": m[1], "feature": m[2],
                         "n_members": len(grp["members"]), "n_graphs": grp["n_graphs"][m],
                         "mean_similarity": grp["mean_similarity"][m], "method": method, "created_at": now})
    cond, p = ("run_id = ?", [run_id]) if run_id else ("true", [])
    replace_rows(atlas_dir, "supernodes", cond, p, rows)
    return len(groups)


@dataclass
class AnalyzeResult:
    """What :func:`analyze` wrote."""

    binding: dict = field(default_factory=dict)
    supernodes: int = 0


def analyze(atlas_dir: str | Path, run_id: str | None = None, regions: str = "auto", supernodes: bool = True,
            **supernode_params) -> AnalyzeResult:
    """Fill the derived tables of an atlas: binding pairs and regions, then supernodes.

    Idempotent (each table's rows of the run are replaced). Creates the derived tables in an atlas
    written before they existed. Raises AtlasError if ``atlas_dir`` is not an atlas.
    """
    result = AnalyzeResult()
    result.binding = write_binding_tables(atlas_dir, run_id=run_id, regions=regions)
    if supernodes:
        result.supernodes = write_supernodes(atlas_dir, run_id=run_id, **supernode_params)
    return result
