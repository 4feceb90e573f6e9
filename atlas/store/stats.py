"""Derived tables of a run, recomputed from its committed activations: feature statistics and
exact top-k examples.

All of it is SQL over the ``activations`` view, so it is exact (no streaming approximations) and
idempotent: a killed or extended run is simply finalised again.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb

from atlas.store.catalog import refresh_views, transaction

_STEP_STATS = """
INSERT INTO feature_step_stats
WITH a AS (
    SELECT layer, stream, step, sigma, feature, value FROM activations WHERE run_id = $run
), agg AS (
    SELECT layer, stream, step, any_value(sigma) AS sigma, feature, count(*) AS firing_count,
           avg(value) AS mean_activation, max(value) AS max_activation
    FROM a GROUP BY layer, stream, step, feature
), binned AS (
    SELECT a.layer, a.stream, a.step, a.feature,
           least(CAST(floor(a.value / agg.max_activation * $bins) AS INTEGER), $bins - 1) AS bin,
           count(*) AS n
    FROM a JOIN agg USING (layer, stream, step, feature)
    GROUP BY ALL
), hist AS (
    SELECT layer, stream, step, feature, list(bin ORDER BY bin) AS bs, list(n ORDER BY bin) AS ns
    FROM binned GROUP BY ALL
)
SELECT $run, agg.layer, agg.stream, agg.step, agg.sigma, agg.feature, agg.firing_count,
       agg.firing_count / (CASE agg.stream WHEN 'img' THEN $img_positions ELSE $txt_positions END),
       agg.mean_activation, agg.max_activation,
       list_transform(range($bins), lambda i: CAST(coalesce(hist.ns[list_position(hist.bs, i)], 0) AS INTEGER))
FROM agg JOIN hist USING (layer, stream, step, feature)
"""

_FEATURES = """
INSERT INTO features
SELECT $run, layer, stream, feature, count(*) AS firing_count,
       count(*) / (CASE stream WHEN 'img' THEN $img_positions ELSE $txt_positions END * $n_steps),
       avg(value), max(value), count(DISTINCT prompt_id), NULL
FROM activations WHERE run_id = $run
GROUP BY layer, stream, feature
"""

_TOP_EXAMPLES = """
COPY (
    WITH best AS (
        SELECT layer, stream, step, sigma, feature, prompt_id, position, value
        FROM activations WHERE run_id = $run
        QUALIFY row_number() OVER (
            PARTITION BY layer, stream, step, feature, prompt_id ORDER BY value DESC, position) = 1
    ), ranked AS (
        SELECT *, row_number() OVER (
            PARTITION BY layer, stream, step, feature ORDER BY value DESC, prompt_id) AS rank
        FROM best QUALIFY rank <= $k
    )
    SELECT $run AS run_id, r.layer, r.stream, CAST(r.step AS TINYINT) AS step, r.sigma, r.feature,
           CAST(r.rank AS SMALLINT) AS rank, r.prompt_id, r.position, r.value,
           t.token,
           CAST(CASE WHEN r.stream = 'img' THEN (r.position % $grid_w) * $patch END AS SMALLINT) AS x0,
           CAST(CASE WHEN r.stream = 'img' THEN (r.position // $grid_w) * $patch END AS SMALLINT) AS y0,
           CAST(CASE WHEN r.stream = 'img' THEN (r.position % $grid_w + 1) * $patch END AS SMALLINT) AS x1,
           CAST(CASE WHEN r.stream = 'img' THEN (r.position // $grid_w + 1) * $patch END AS SMALLINT) AS y1
    FROM ranked r
    LEFT JOIN prompt_tokens t
      ON r.stream = 'txt' AND t.run_id = $run AND t.prompt_id = r.prompt_id AND t.position = r.position
    ORDER BY r.layer, r.stream, r.feature, r.step, r.rank
) TO '{dest}' (FORMAT parquet, COMPRESSION zstd, PARTITION_BY (run_id, layer, stream))
"""


def positions_seen(con: duckdb.DuckDBPyConnection, run_id: str, image_tokens: int) -> tuple[int, int]:
    """(image-stream, text-stream) positions seen per step over the run's committed generations."""
    ((n, txt),) = con.execute(
        "SELECT count(*), coalesce(sum(n_tokens), 0) FROM prompts WHERE run_id = ?", [run_id]
    ).fetchall()
    return n * image_tokens, int(txt)


def finalize_run(
    con: duckdb.DuckDBPyConnection,
    atlas_dir: Path,
    run_id: str,
    *,
    image_tokens: int,
    grid_w: int,
    patch_px: int,
    n_steps: int,
    top_k: int,
    bins: int,
) -> None:
    """Recompute ``feature_step_stats``, ``features`` and ``top_examples`` of one run.

    Density = firing count / positions seen (image: generations x ``image_tokens``; text: the
    sum of non-padding T5 tokens), per step; over all steps it is divided by ``n_steps`` too.
    The histogram has ``bins`` equal bins over (0, max_activation]. A top example is a
    generation's strongest position for that feature and step, generations ranked by value
    (ties broken by prompt id); image positions map to the pixel box of their
    ``patch_px`` x ``patch_px`` patch on a grid ``grid_w`` patches wide.
    """
    img_pos, txt_pos = positions_seen(con, run_id, image_tokens)
    params = {"run": run_id, "img_positions": max(img_pos, 1), "txt_positions": max(txt_pos, 1)}
    with transaction(con):
        con.execute("DELETE FROM feature_step_stats WHERE run_id = ?", [run_id])
        con.execute("DELETE FROM features WHERE run_id = ?", [run_id])
        con.execute(_STEP_STATS, {**params, "bins": bins})
        con.execute(_FEATURES, {**params, "n_steps": n_steps})
    _write_top_examples(con, atlas_dir, run_id, grid_w=grid_w, patch_px=patch_px, top_k=top_k)


def _write_top_examples(con, atlas_dir: Path, run_id: str, *, grid_w: int, patch_px: int, top_k: int) -> None:
    """Write the top examples into a staging folder, then swap it in for the run's old ones."""
    root = atlas_dir / "facts" / "top_examples"
    staging = atlas_dir / "facts" / f".top_examples-{run_id}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    # The destination is a path (not a value) and COPY cannot bind it; it is our own folder name.
    sql = _TOP_EXAMPLES.format(dest=str(staging).replace("'", "''"))
    con.execute(sql, {"run": run_id, "k": top_k, "grid_w": grid_w, "patch": patch_px})
    new = staging / f"run_id={run_id}"
    old = root / f"run_id={run_id}"
    root.mkdir(parents=True, exist_ok=True)
    if old.exists():
        shutil.rmtree(old)
    if new.exists():
        new.rename(old)
    shutil.rmtree(staging, ignore_errors=True)
    refresh_views(con, atlas_dir)
