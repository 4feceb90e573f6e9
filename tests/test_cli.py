"""The `atlas` command line: demo, ingest errors, ad-hoc SQL."""

from click.testing import CliRunner

from atlas.cli import EXAMPLE_QUERIES, main


def test_demo_prints_queries_that_run(tmp_path):
    out = tmp_path / "demo"
    runner = CliRunner()
    result = runner.invoke(main, ["demo", "--out", str(out), "--limit", "6", "--trace-prompts", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"Demo atlas written: {out}" in result.output
    for _, query in EXAMPLE_QUERIES:
        assert query in result.output
        ran = runner.invoke(main, ["sql", str(out), query, "--format", "csv"])
        assert ran.exit_code == 0, ran.output
        assert len(ran.output.strip().splitlines()) >= 2, (query, ran.output)  # header + at least one row
    csv = runner.invoke(main, ["sql", str(out), "SELECT count(*) AS n FROM prompts", "--format", "csv"])
    assert csv.output.splitlines() == ["n", "6"]
    # Every generation was judged by the oracle; the first two-object prompt got one graph per object region.
    from atlas.demo import DEMO_PROMPTS, DEMO_TARGETS
    from atlas.query import Atlas
    from atlas.toy.world import parse_prompt

    atlas = Atlas(out)
    assert atlas.sql("SELECT count(DISTINCT prompt_id) AS n FROM generation_errors")["n"][0] == 6
    assert atlas.sql("SELECT DISTINCT model_id FROM runs")["model_id"].to_list() == ["toy"]
    first_pair = next(i for i, line in enumerate(DEMO_PROMPTS.read_text().splitlines()[:6])
                      if len(parse_prompt(line)) == 2)
    graphs = atlas.sql("SELECT prompt_id, target_spec, status FROM graphs ORDER BY target_spec")
    assert graphs["prompt_id"].to_list() == [first_pair] * 2
    assert sorted(graphs["target_spec"].to_list()) == sorted(DEMO_TARGETS)
    assert (out / "report" / "index.html").is_file()
    # the shipped transcoders and the SAE baseline were evaluated into the atlas (the report's fidelity table)
    roles = atlas.sql("SELECT role, count(DISTINCT (layer, stream)) AS n FROM transcoder_metrics GROUP BY role ORDER BY role")
    assert roles.rows() == [("sae", 2), ("transcoder", 8)]


def test_sql_is_read_only_and_errors_are_clean(tmp_path):
    out = tmp_path / "a"
    runner = CliRunner()
    assert runner.invoke(main, ["demo", "--out", str(out), "--limit", "2", "--no-progress"]).exit_code == 0
    result = runner.invoke(main, ["sql", str(out), "DELETE FROM prompts"])
    assert result.exit_code == 2 and "read-only" in result.output.lower()
    result = runner.invoke(main, ["sql", str(out), "SELECT nope FROM prompts"])
    assert result.exit_code == 2 and "error:" in result.output


def test_ingest_reports_bad_prompt_file(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tother\nx\ty\n")
    result = CliRunner().invoke(main, ["ingest", "--prompts", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "no 'Prompt' column" in result.output
    assert not (tmp_path / "o").exists()


def test_ingest_reports_unknown_stream_and_bad_layers(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red car\n")
    runner = CliRunner()
    result = runner.invoke(main, ["ingest", "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--streams", "img,audio"])
    assert result.exit_code == 2 and "available streams" in result.output
    result = runner.invoke(main, ["ingest", "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--layers", "1,x"])
    assert result.exit_code == 2 and "--layers takes comma-separated integers" in result.output


def test_query_command(small_atlas, tmp_path):
    import polars as pl

    runner = CliRunner()
    listing = runner.invoke(main, ["query", "--list"])
    assert listing.exit_code == 0 and "top_features" in listing.output and "--param k=<INTEGER>" in listing.output
    result = runner.invoke(main, ["query", str(small_atlas), "top_features", "-p", "k=1", "-p", "stream=txt", "--format", "csv"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("run_id,layer,stream,rank,feature") and len(lines) == 1 + 4
    out = tmp_path / "top.parquet"
    result = runner.invoke(main, ["query", str(small_atlas), "top_features", "--format", "parquet", "--out", str(out)])
    assert result.exit_code == 0 and len(pl.read_parquet(out)) == 4 * 2 * 10
    bad = runner.invoke(main, ["query", str(small_atlas), "top_features", "-p", "k"])
    assert bad.exit_code == 2 and "KEY=VALUE" in bad.output
    bad = runner.invoke(main, ["query", str(small_atlas), "no_such_query"])
    assert bad.exit_code == 2 and "available:" in bad.output


def test_default_transcoders_follow_the_model_given(tmp_path):
    from atlas.cli import build_config

    assert build_config(None).model == "toy" and build_config(None).transcoders == "toy"
    assert build_config(None, model="tiny").transcoders == "random-init"     # not the toy's
    assert build_config(None, model="tiny", transcoders="my-folder").transcoders == "my-folder"
    toml = tmp_path / "run.toml"
    toml.write_text('model = "toy"\ntranscoders = "toy"\n')
    assert build_config(str(toml), model="tiny").transcoders == "toy"           # the file named them
    toml.write_text('model = "toy"\n')
    assert build_config(str(toml), model="tiny").transcoders == "random-init"
    result = CliRunner().invoke(main, ["ingest", "--prompts", str(toml), "--out", str(tmp_path / "o"),
                                       "--model", "some/other-model"])
    assert result.exit_code == 2 and "no transcoders given for model 'some/other-model'" in result.output
