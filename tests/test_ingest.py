"""`atlas ingest` end to end on the tiny pipeline: tables, oracles for codes/stats/top-k, resume,
refusals, and plain-SQL access to the atlas folder."""

import hashlib
import os
import shutil
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
import torch

from atlas.ingest.config import ConfigError, RunConfig
from atlas.ingest.encode import SparseCodes
from atlas.ingest.prompts import PromptFileError
from atlas.ingest.runner import run_ingest
from atlas.ingest.transcoder_setup import setup_transcoders
from atlas.model import MLPCapture, load_pipeline, recommended_settings
from atlas.store.catalog import AtlasError, connect

LONG = " ".join(["a red car next to a blue house"] * 6)
PROMPTS = [
    "a green bench and a blue bowl",
    "",
    "a café with naïve décor ✨",
    LONG,
    "a red cube and a blue sphere",
    "a purple triangle",
    "an orange circle and a yellow square",
    "a photo of a dog",
]


def sql(atlas_dir, query, params=None) -> pl.DataFrame:
    with connect(atlas_dir, read_only=True) as con:
        return con.sql(query, params=params).pl()


def tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("prompts") / "p.txt"
    f.write_bytes("\r\n".join(PROMPTS).encode("utf-8"))
    return f


@pytest.fixture(scope="module")
def cfg(prompt_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("atlas") / "a"
    return RunConfig(prompts=str(prompt_file), out=str(out), batch_size=3, top_k=3, seeds=[0, 1],
                     model="tiny")


@pytest.fixture(scope="module")
def atlas_dir(cfg):
    result = run_ingest(cfg, progress=False)
    assert result.generations_new == 14 and result.blank_lines == 1 and result.truncated == 2
    return Path(cfg.out)


def test_prompts_tokens_images(atlas_dir):
    prompts = sql(atlas_dir, "SELECT * FROM prompts ORDER BY prompt_id")
    assert prompts["prompt_id"].to_list() == list(range(14))
    assert prompts["seed"].to_list() == [0, 1] * 7
    assert prompts["source_line"].to_list()[::2] == [1, 3, 4, 5, 6, 7, 8]
    assert "\r" not in "".join(prompts["text"])
    long = prompts.filter(pl.col("text") == LONG)
    assert long["truncated"].to_list() == [True, True] and long["n_tokens"][0] == 32 and long["n_tokens_full"][0] > 32
    assert prompts.filter(pl.col("text") != LONG)["truncated"].sum() == 0
    tokens = sql(atlas_dir, "SELECT token FROM prompt_tokens WHERE prompt_id = 0 ORDER BY position")["token"].to_list()
    assert tokens == ["a", "green", "bench", "and", "a", "blue", "bowl", "</s>"]
    images = sql(atlas_dir, "SELECT * FROM images ORDER BY prompt_id")
    assert len(images) == 14
    for row in images.iter_rows(named=True):
        data = (atlas_dir / row["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"] and (row["height"], row["width"]) == (32, 32)
    run = sql(atlas_dir, "SELECT * FROM runs")
    assert run["status"].to_list() == ["complete"] and run["n_prompts"].to_list() == [14]
    assert set(sql(atlas_dir, "SELECT layer FROM transcoders")["layer"]) == {0, 1, 2, 3}


def test_activations_match_direct_encoding(atlas_dir, cfg):
    """Oracle: rerun generation 2 (prompt 'a café...', seed 0) by hand and encode it directly."""
    pipe = load_pipeline("tiny")
    settings = recommended_settings("tiny")
    gen = {k: settings[k] for k in ("height", "width", "num_inference_steps", "guidance_scale", "max_sequence_length")}
    transcoders, rows, _ = setup_transcoders(cfg, pipe, [0, 1, 2, 3], gen, "cpu")
    stored = sql(atlas_dir, "SELECT layer, stream, checksum FROM transcoders")
    assert {(r["layer"], r["stream"], r["checksum"]) for r in rows} == set(stored.iter_rows())
    text = PROMPTS[2]
    n_tokens = int(sql(atlas_dir, "SELECT n_tokens FROM prompts WHERE prompt_id = 2")["n_tokens"][0])
    codes = SparseCodes(transcoders, [2], [n_tokens])
    with MLPCapture(pipe.transformer, [0, 1, 2, 3], ["img", "txt"], on_step=codes.add_step):
        pipe(prompt=[text], generator=[torch.Generator().manual_seed(0)], output_type="pil", **gen)
    for (layer, stream), cols in codes.partitions(0):
        want = pl.DataFrame({k: cols[k] for k in ("step", "position", "feature", "value")}).sort("step", "position", "feature")
        got = sql(atlas_dir, "SELECT step, position, feature, value FROM activations WHERE prompt_id = 2 "
                  "AND layer = ? AND stream = ? ORDER BY step, position, feature", [layer, stream])
        assert len(got) == len(want) > 0
        assert got["position"].to_list() == want["position"].to_list()
        assert got["feature"].to_list() == want["feature"].to_list()
        np.testing.assert_allclose(got["value"].to_numpy(), want["value"].to_numpy(), rtol=1e-5, atol=1e-6)
        if stream == "txt":
            assert got["position"].max() < n_tokens  # padding is never stored


def test_no_duplicate_rows_and_density_is_sparse(atlas_dir):
    (n, distinct), = sql(atlas_dir, "SELECT count(*), count(DISTINCT (prompt_id, layer, stream, step, position, feature)) "
                         "FROM activations").rows()
    assert n == distinct > 0
    per_pos = sql(atlas_dir, "SELECT stream, count(*) / count(DISTINCT (prompt_id, layer, step, position)) AS l0 "
                  "FROM activations GROUP BY stream")
    assert per_pos["l0"].max() < 0.1 * 96 * 16  # calibrated random init fires ~1% of 1536 features


def test_feature_stats_match_recomputation(atlas_dir):
    acts = sql(atlas_dir, "SELECT * FROM activations")
    (n_gen, txt_pos), = sql(atlas_dir, "SELECT count(*), CAST(sum(n_tokens) AS BIGINT) FROM prompts").rows()
    want = acts.group_by("layer", "stream", "step", "feature").agg(
        pl.len().alias("n"), pl.col("value").mean().alias("mean"), pl.col("value").max().alias("max"))
    got = sql(atlas_dir, "SELECT * FROM feature_step_stats")
    both = want.join(got, on=["layer", "stream", "step", "feature"], how="full", coalesce=True)
    assert len(both) == len(want) == len(got)
    assert (both["n"] == both["firing_count"]).all()
    np.testing.assert_allclose(both["mean"], both["mean_activation"], rtol=1e-5)
    np.testing.assert_allclose(both["max"], both["max_activation"], rtol=1e-6)
    positions = np.where(both["stream"] == "img", n_gen * 64, txt_pos)
    np.testing.assert_allclose(both["density"], both["n"].to_numpy() / positions)
    assert (both["hist_counts"].list.sum() == both["n"]).all()
    assert (both["hist_counts"].list.len() == 16).all()
    features = sql(atlas_dir, "SELECT sum(firing_count) AS n FROM features")["n"][0]
    assert features == len(acts)


def test_top_examples_are_exact(atlas_dir):
    acts = sql(atlas_dir, "SELECT layer, stream, step, feature, prompt_id, position, value FROM activations")
    best = (acts.sort(["value", "position"], descending=[True, False])
            .group_by("layer", "stream", "step", "feature", "prompt_id", maintain_order=True).first())
    want = (best.sort(["value", "prompt_id"], descending=[True, False])
            .group_by("layer", "stream", "step", "feature", maintain_order=True).head(3)
            .with_columns(pl.col("prompt_id").cum_count().over("layer", "stream", "step", "feature").alias("rank")))
    got = sql(atlas_dir, "SELECT * FROM top_examples")
    key = ["layer", "stream", "step", "feature", "rank"]
    joined = want.join(got, on=key, how="full", coalesce=True)
    assert len(joined) == len(want) == len(got)
    assert (joined["prompt_id"] == joined["prompt_id_right"]).all()
    assert (joined["position"] == joined["position_right"]).all()
    img = got.filter(pl.col("stream") == "img")
    assert (img["x0"] == (img["position"] % 8) * 4).all() and (img["y1"] == (img["position"] // 8 + 1) * 4).all()
    txt = got.filter(pl.col("stream") == "txt")
    assert txt["token"].null_count() == 0 and img["token"].null_count() == len(img)


def test_plain_duckdb_from_the_atlas_folder_after_moving_it(atlas_dir, tmp_path, monkeypatch):
    moved = tmp_path / "moved-atlas"
    shutil.copytree(atlas_dir, moved)
    monkeypatch.chdir(moved)  # what `cd ATLAS && duckdb atlas.duckdb` does
    con = duckdb.connect("atlas.duckdb", read_only=True)
    try:
        for table in ("activations", "top_examples", "prompts", "features", "feature_step_stats"):
            (n,), = con.execute(f"SELECT count(*) FROM {table}").fetchall()
            assert n > 0, table
    finally:
        con.close()


def test_rerun_resumes_and_extends(atlas_dir, cfg):
    before = sql(atlas_dir, "SELECT count(*) AS n FROM activations")["n"][0]
    again = run_ingest(RunConfig(**{**cfg.to_dict(), "batch_size": 5}), progress=False)
    assert again.resumed and again.generations_new == 0
    assert sql(atlas_dir, "SELECT count(*) AS n FROM activations")["n"][0] == before
    assert sql(atlas_dir, "SELECT count(*) AS n FROM runs")["n"][0] == 1


def test_other_config_is_refused_and_nothing_changes(atlas_dir, cfg):
    digest = tree_digest(atlas_dir)
    other = RunConfig(**{**cfg.to_dict(), "layers": [0]})
    with pytest.raises(AtlasError, match=r"different configuration(.|\n)*layers(.|\n)*--new-run"):
        run_ingest(other, progress=False)
    assert tree_digest(atlas_dir) == digest


def test_bad_input_loses_nothing(atlas_dir, cfg, tmp_path):
    digest = tree_digest(atlas_dir)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a red car\n\xff\xfe broken\n")
    with pytest.raises(PromptFileError, match="line 2"):
        run_ingest(RunConfig(**{**cfg.to_dict(), "prompts": str(bad)}), progress=False)
    with pytest.raises(ConfigError, match=r"available streams: \['img', 'txt'\]"):
        run_ingest(RunConfig(**{**cfg.to_dict(), "streams": ["vid"]}), progress=False)
    assert tree_digest(atlas_dir) == digest
    fresh = tmp_path / "fresh"
    with pytest.raises(ConfigError, match=r"available double-stream layers: 0\.\.3"):
        run_ingest(RunConfig(**{**cfg.to_dict(), "out": str(fresh), "layers": [7]}), progress=False)
    assert not fresh.exists()  # nothing is created before the configuration is known to work


def test_new_run_and_schema_version(cfg, tmp_path):
    out = tmp_path / "b"
    small = {**cfg.to_dict(), "out": str(out), "limit": 2, "seeds": [0], "layers": [1]}
    run_ingest(RunConfig(**small), progress=False)
    second = run_ingest(RunConfig(**{**small, "layers": [2], "streams": ["img"]}), new_run=True, progress=False)
    runs = sql(out, "SELECT run_id, config_json FROM runs ORDER BY started_at")
    assert len(runs) == 2 and runs["run_id"][1] == second.run_id
    layers = sql(out, "SELECT run_id, list(DISTINCT layer) AS l FROM activations GROUP BY run_id ORDER BY run_id")
    assert sorted(map(sorted, layers["l"].to_list())) == [[1], [2]]
    resumed = run_ingest(RunConfig(**{**small, "layers": [3], "limit": 3}), resume=True, progress=False)
    assert resumed.run_id == second.run_id and resumed.generations_new == 1
    con = duckdb.connect(str(out / "atlas.duckdb"))
    con.execute("UPDATE atlas_meta SET value = '999' WHERE key = 'schema_version'")
    con.close()
    digest = tree_digest(out)
    with pytest.raises(AtlasError, match="schema version 999"):
        run_ingest(RunConfig(**small), progress=False)
    assert tree_digest(out) == digest
