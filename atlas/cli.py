"""`atlas`: the command line, one subcommand per stage of the data's journey."""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import click

from atlas.ingest.config import ConfigError, RunConfig, load_run_config

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_PROMPTS = REPO_ROOT / "data" / "prompts" / "t2i-compbench" / "color_val.txt"
DEMO_OUT = REPO_ROOT / "data" / "atlases" / "demo"

EXAMPLE_QUERIES = [
    ("features firing most often per layer and stream",
     "SELECT layer, stream, feature, firing_count, round(density, 4) AS density FROM features "
     "QUALIFY row_number() OVER (PARTITION BY layer, stream ORDER BY firing_count DESC) <= 3 "
     "ORDER BY layer, stream, firing_count DESC"),
    ("top examples of one image-stream feature",
     "SELECT t.step, t.rank, p.text, t.position, t.x0, t.y0, round(t.value, 3) AS value FROM top_examples t "
     "JOIN prompts p USING (run_id, prompt_id) WHERE t.stream = 'img' AND t.layer = 0 "
     "AND t.feature = (SELECT feature FROM features WHERE stream = 'img' AND layer = 0 ORDER BY firing_count DESC LIMIT 1) "
     "AND t.step = 0 ORDER BY t.rank LIMIT 5"),
    ("text tokens on which layer-1 text-stream features fire most at the first step",
     "SELECT tok.token, count(*) AS n FROM activations a JOIN prompt_tokens tok USING (run_id, prompt_id, position) "
     "WHERE a.stream = 'txt' AND a.layer = 1 AND a.step = 0 GROUP BY tok.token ORDER BY n DESC LIMIT 8"),
]


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@click.group()
@click.version_option(package_name="circuit-atlas")
@click.option("-v", "--verbose", is_flag=True, help="Log more (debug level).")
def main(verbose: bool) -> None:
    """circuit atlas: trace circuits of FLUX-architecture text-to-image models into SQL tables."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()  # the atlas reports truncation itself, per prompt and line
    tlog.set_verbosity_error()


def _ingest_options(f):
    opts = [
        click.option("--prompts", type=click.Path(dir_okay=False), help="Prompt file: .txt (a line each), .tsv (Prompt column), .jsonl (prompt field)."),
        click.option("--out", type=click.Path(file_okay=False), help="Atlas folder to create or extend."),
        click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="TOML run config (see ingest/); options given here override it."),
        click.option("--model", help="Hub id, local folder, or built-in ('tiny'). Default: the built-in offline model."),
        click.option("--revision", help="Hub revision (branch, tag or commit) of the model."),
        click.option("--transcoders", help="Folder or hub repo in the DifFRACT layout, or 'random-init'."),
        click.option("--role", type=click.Choice(["transcoder", "sae"]), help="Load transcoders (MLP in -> out) or SAEs (out -> out)."),
        click.option("--layers", help="Comma-separated double-stream block indices (default: all)."),
        click.option("--streams", help="Comma-separated streams: img,txt."),
        click.option("--steps", type=int, help="Denoising steps (default: the model's recommended)."),
        click.option("--height", type=int), click.option("--width", type=int),
        click.option("--seeds", help="Comma-separated seeds; each prompt is generated once per seed."),
        click.option("--batch-size", type=int), click.option("--top-k", type=int),
        click.option("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"])),
        click.option("--limit", type=int, help="Ingest only the first N prompts of the file."),
        click.option("--resume", is_flag=True, help="Continue the atlas's latest run with its stored config."),
        click.option("--new-run", is_flag=True, help="Add a new run to an atlas that holds a run of another config."),
        click.option("--no-progress", is_flag=True, help="No progress bar."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _int_list(text: str, name: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--{name} takes comma-separated integers, got {text!r}") from None


def build_config(config_file: str | None, **options) -> RunConfig:
    """RunConfig from an optional TOML file overridden by the command-line options that were set."""
    cfg = load_run_config(config_file) if config_file else RunConfig()
    if options.get("layers") is not None:
        options["layers"] = _int_list(options["layers"], "layers")
    if options.get("seeds") is not None:
        options["seeds"] = _int_list(options["seeds"], "seeds")
    if options.get("streams") is not None:
        options["streams"] = [s.strip() for s in options["streams"].split(",") if s.strip()]
    set_options = {k: v for k, v in options.items() if v is not None}
    return dataclasses.replace(cfg, **set_options)


@main.command()
@_ingest_options
def ingest(config_file, resume, new_run, no_progress, **options):
    """Run prompts through the model with transcoders and write an atlas."""
    from atlas.ingest.prompts import PromptFileError
    from atlas.ingest.runner import run_ingest
    from atlas.store.catalog import AtlasError
    from atlas.transcoders import CheckpointError

    try:
        cfg = build_config(config_file, **options)
        result = run_ingest(cfg, new_run=new_run, resume=resume, progress=not no_progress)
    except (ConfigError, PromptFileError, AtlasError, CheckpointError, FileNotFoundError) as e:
        _fail(str(e))
    click.echo(
        f"atlas: {result.atlas_dir}\nrun {result.run_id}: {result.generations_new} new generation(s), "
        f"{result.generations_total} in total; {result.blank_lines} blank line(s) skipped, "
        f"{result.truncated} prompt(s) truncated"
    )


@main.command()
@click.option("--out", type=click.Path(file_okay=False), default=str(DEMO_OUT), show_default=True)
@click.option("--limit", type=int, default=None, help="Ingest only the first N prompts (default: all 300 of T2I-CompBench color_val).")
@click.option("--no-progress", is_flag=True)
def demo(out, limit, no_progress):
    """The whole journey on the built-in offline model and a shipped prompt set (CPU, minutes)."""
    from atlas.ingest.runner import run_ingest

    cfg = RunConfig(prompts=str(DEMO_PROMPTS), out=out, limit=limit)
    try:
        result = run_ingest(cfg, progress=not no_progress)
    except Exception as e:  # noqa: BLE001 - the demo reports any failure plainly
        _fail(f"{type(e).__name__}: {e}")
    click.echo(f"\nDemo atlas written: {result.atlas_dir}  (run {result.run_id}, {result.generations_total} generations)")
    click.echo("Query it with SQL, e.g.\n")
    click.echo(f"  cd {result.atlas_dir} && duckdb atlas.duckdb   # or: atlas sql {result.atlas_dir} \"...\"\n")
    for title, sql in EXAMPLE_QUERIES:
        click.echo(f"-- {title}\n{sql};\n")


@main.command()
@click.argument("atlas_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("sql")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
def sql(atlas_dir, sql, fmt):
    """Run ad-hoc SQL on an atlas (read-only)."""
    import duckdb

    from atlas.store.catalog import AtlasError, connect

    try:
        with connect(atlas_dir, read_only=True) as con:
            relation = con.sql(sql)
            if relation is None:  # a statement with no result (read-only: SET, PRAGMA ...)
                return
            frame = relation.pl()
    except (AtlasError, duckdb.Error) as e:
        _fail(str(e))
    if fmt == "csv":
        click.echo(frame.write_csv(), nl=False)
    elif fmt == "json":
        click.echo(frame.write_json())
    else:
        import polars as pl

        with pl.Config(tbl_rows=50, tbl_cols=20, fmt_str_lengths=60, tbl_width_chars=240):
            click.echo(frame)


if __name__ == "__main__":
    main()
