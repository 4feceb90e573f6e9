"""The SQL library and the query API on a real atlas: every named query runs, returns the columns
its header documents, agrees with a direct recomputation, and binds its parameters."""

import subprocess
import sys

import duckdb
import polars as pl
import pytest

from atlas.query import Atlas, QueryError, get_query, list_queries


@pytest.fixture(scope="module")
def atlas(small_atlas):
    return Atlas(small_atlas)


def _busiest(atlas, stream="img"):
    row = atlas.sql("SELECT layer, feature FROM features WHERE stream = ? ORDER BY firing_count DESC, layer, feature "
                    "LIMIT 1", [stream]).row(0)
    return {"layer": row[0], "stream": stream, "feature": row[1]}


def test_every_query_runs_and_returns_its_documented_columns(atlas):
    queries = list_queries()
    assert {"top_features", "feature_firing", "cofiring_features", "transcoder_fidelity"} <= set(queries)
    for q in queries.values():
        assert q.answers and q.columns, q.name
        frame = atlas.query(q.name)
        assert frame.columns == q.columns, q.name


def test_top_features_matches_features_table(atlas):
    got = atlas.query("top_features", k=3, order_by="max_activation", layer=2)
    feats = atlas.sql("SELECT * FROM features WHERE layer = 2")
    want = (feats.sort(["max_activation", "feature"], descending=[True, False])
            .group_by("stream", maintain_order=True).head(3))
    assert set(got["stream"]) == {"img", "txt"}
    for stream in ("img", "txt"):
        assert got.filter(pl.col("stream") == stream)["feature"].to_list() == \
            want.filter(pl.col("stream") == stream)["feature"].to_list()
    assert (got["layer"] == 2).all() and got["rank"].max() == 3


def test_feature_firing_lists_every_activation(atlas):
    f = _busiest(atlas)
    got = atlas.query("feature_firing", max_rows=100000, **f)
    n = atlas.sql("SELECT count(*) AS n FROM activations WHERE layer = ? AND stream = ? AND feature = ?",
                  [f["layer"], f["stream"], f["feature"]])["n"][0]
    assert len(got) == n > 0
    assert got["value"].is_sorted(descending=True)
    assert ((got["x1"] - got["x0"]) == 4).all() and ((got["y0"] // 4) * 8 + got["x0"] // 4 == got["position"]).all()
    t = _busiest(atlas, "txt")
    txt = atlas.query("feature_firing", **t)
    assert txt["token"].null_count() == 0 and txt["x0"].null_count() == len(txt)


def test_cofiring_counts_match_a_self_join(atlas):
    f = _busiest(atlas)
    got = atlas.query("cofiring_features", k=5, **f)
    acts = atlas.sql("SELECT prompt_id, step, position, layer, feature FROM activations WHERE stream = 'img'")
    anchor = acts.filter((pl.col("layer") == f["layer"]) & (pl.col("feature") == f["feature"]))
    co = (acts.join(anchor.select("prompt_id", "step", "position"), on=["prompt_id", "step", "position"])
          .filter(~((pl.col("layer") == f["layer"]) & (pl.col("feature") == f["feature"])))
          .group_by("layer", "feature").len())
    for row in got.iter_rows(named=True):
        want = co.filter((pl.col("layer") == row["layer"]) & (pl.col("feature") == row["feature"]))["len"][0]
        assert row["co_count"] == want
        assert row["co_fraction"] == pytest.approx(want / len(anchor))
    assert got["co_count"].to_list() == sorted(co["len"].to_list(), reverse=True)[:5]


def test_parameters_are_bound_not_pasted(atlas):
    evil = "x' OR 1=1 --"
    assert len(atlas.query("top_features", run_id=evil)) == 0
    assert len(atlas.sql("SELECT * FROM prompts WHERE text = ?", [evil])) == 0
    with pytest.raises(QueryError, match=r"no parameter\(s\) \['kk'\]; parameters: \['k'"):
        atlas.query("top_features", kk=3)
    with pytest.raises(QueryError, match="INTEGER"):
        atlas.query("top_features", k="three")
    with pytest.raises(QueryError, match="no query named 'nope'; available: .*top_features"):
        get_query("nope")
    with pytest.raises(QueryError):
        get_query("../pyproject")


def test_parameter_named_like_a_sql_keyword(atlas, tmp_path):
    """A user query whose parameters are SQL reserved words (`order`, `limit`) still binds them."""
    (tmp_path / "keyword_params.sql").write_text(
        "-- answers: Prompts by id, in a chosen order.\n"
        "-- param: order VARCHAR = 'asc' | 'asc' or 'desc'\n"
        "-- param: limit INTEGER = 2 | rows\n"
        "-- columns: prompt_id\n"
        "SELECT prompt_id FROM prompts\n"
        "ORDER BY CASE WHEN coalesce(getvariable('order'), 'asc') = 'desc' THEN -prompt_id ELSE prompt_id END\n"
        "LIMIT coalesce(getvariable('limit'), 2)\n")
    user = Atlas(atlas.path, queries_dir=tmp_path)
    ids = sorted(atlas.sql("SELECT prompt_id FROM prompts")["prompt_id"].to_list())
    assert user.query("keyword_params")["prompt_id"].to_list() == ids[:2]
    assert user.query("keyword_params", order="desc", limit=3)["prompt_id"].to_list() == ids[::-1][:3]


def test_query_files_run_in_a_plain_duckdb_client(small_atlas, monkeypatch):
    """What `cd ATLAS && duckdb atlas.duckdb` then `SET VARIABLE k = 2; .read queries/top_features.sql` does."""
    monkeypatch.chdir(small_atlas)
    con = duckdb.connect("atlas.duckdb", read_only=True)
    try:
        con.execute("SET VARIABLE k = 2")
        rows = con.execute(get_query("top_features").sql).fetchall()
        assert len(rows) == 4 * 2 * 2  # 4 layers x 2 streams x k
        con.execute("RESET VARIABLE k")
        assert len(con.execute(get_query("top_features").sql).fetchall()) == 4 * 2 * 10  # documented default
    finally:
        con.close()


def test_query_stage_imports_no_torch():
    code = "import sys, atlas.query, atlas.store.catalog; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
