"""`atlas`: the command line, one subcommand per stage of the data's journey."""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import click

from atlas.ingest.config import ConfigError, RunConfig, load_run_config

from atlas.demo import DEMO_OUT

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


def _quiet_libraries() -> None:
    """Silence diffusers/transformers warnings (the atlas reports truncation itself, per prompt and
    line). Called only by commands that load a model, so query commands start without importing them."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()  # "Loading pipeline components": the atlas shows its own progress
    tlog.disable_progress_bar()


def _ingest_options(f):
    opts = [
        click.option("--prompts", type=click.Path(dir_okay=False), help="Prompt file: .txt (a line each), .tsv (Prompt column), .jsonl (prompt field)."),
        click.option("--out", type=click.Path(file_okay=False), help="Atlas folder to create or extend."),
        click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="TOML run config (see ingest/); options given here override it."),
        click.option("--model", help="Hub id, local folder, or built-in ('toy', the default; 'tiny', untrained)."),
        click.option("--revision", help="Hub revision (branch, tag or commit) of the model."),
        click.option("--transcoders", help="Folder or hub repo in the DifFRACT layout, built-in 'toy', or 'random-init'. "
                                              "Default: the model's shipped ones (toy) or random-init (tiny)."),
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
    if "model" in set_options and "transcoders" not in set_options and not _file_sets(config_file, "transcoders"):
        set_options["transcoders"] = None  # the default transcoders of the model given here, not the file's
    return dataclasses.replace(cfg, **set_options)


def _file_sets(config_file: str | None, key: str) -> bool:
    """Whether the TOML run config names `key` (its defaults depend on other keys)."""
    if not config_file:
        return False
    import tomllib

    return key in tomllib.loads(Path(config_file).read_text(encoding="utf-8"))


@main.command()
@_ingest_options
def ingest(config_file, resume, new_run, no_progress, **options):
    """Run prompts through the model with transcoders and write an atlas."""
    _quiet_libraries()
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
@click.option("--limit", type=int, default=None,
              help="Ingest only the first N prompts (default: all 376 held-out prompts of the toy world).")
@click.option("--trace-prompts", type=int, default=8, show_default=True,
              help="Two-object prompts to trace (two graphs each; 0 skips tracing).")
@click.option("--no-progress", is_flag=True)
def demo(out, limit, trace_prompts, no_progress):
    """The whole journey on the shipped toy model: ingest, oracle labels, graphs, analyses, report (CPU, minutes)."""
    from atlas.demo import run_demo

    _quiet_libraries()
    try:
        result = run_demo(out, limit=limit, trace_prompts=trace_prompts, progress=not no_progress, echo=click.echo)
    except Exception as e:  # noqa: BLE001 - the demo reports any failure plainly
        _fail(f"{type(e).__name__}: {e}")
    click.echo(f"\nDemo atlas written: {result.atlas_dir}  (run {result.run_id}, {result.generations} generations, "
               f"{result.with_errors} with errors, {result.graphs} graphs)")
    click.echo("Query it with SQL, e.g.\n")
    click.echo(f"  cd {result.atlas_dir} && duckdb atlas.duckdb   # or: atlas sql {result.atlas_dir} \"...\"\n")
    for title, sql in EXAMPLE_QUERIES:
        click.echo(f"-- {title}\n{sql};\n")
    click.echo(f"Named questions: atlas query --list; e.g. atlas query {result.atlas_dir} error_explanations\n")
    click.echo(f"Open the report in a browser: {result.report_index}")


def _print_frame(frame, fmt: str, out: str | None) -> None:
    """Print a polars DataFrame as a table, CSV or JSON, or write it to a file (parquet needs --out)."""
    import polars as pl

    if fmt == "parquet":
        if not out:
            _fail("--format parquet needs --out FILE")
        frame.write_parquet(out)
        click.echo(f"wrote {len(frame)} rows to {out}")
        return
    if fmt == "csv":  # CSV has no nested types: list columns (e.g. prompt_ids) are written as "[1, 2]"
        lists = [c for c, t in frame.schema.items() if isinstance(t, pl.List) and not t.inner.is_nested()]
        text = frame.with_columns(pl.concat_str([pl.lit("["), pl.col(c).cast(pl.List(pl.String)).list.join(", "), pl.lit("]")]).alias(c)
                                  for c in lists).write_csv()
    elif fmt == "json":
        text = frame.write_json()
    else:
        with pl.Config(tbl_rows=50, tbl_cols=20, fmt_str_lengths=60, tbl_width_chars=240):
            text = str(frame)
    if out:
        Path(out).write_text(text, encoding="utf-8")
        click.echo(f"wrote {len(frame)} rows to {out}")
    else:
        click.echo(text, nl=not text.endswith("\n"))


_FORMATS = click.Choice(["table", "csv", "json", "parquet"])


@main.command()
@click.argument("atlas_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("sql")
@click.option("--format", "fmt", type=_FORMATS, default="table", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="Write the result to a file.")
def sql(atlas_dir, sql, fmt, out):
    """Run ad-hoc SQL on an atlas (read-only)."""
    import duckdb

    from atlas.query import Atlas
    from atlas.store.catalog import AtlasError

    try:
        frame = Atlas(atlas_dir).sql(sql)
    except (AtlasError, duckdb.Error) as e:
        _fail(str(e))
    _print_frame(frame, fmt, out)


@main.command()
@click.argument("atlas_dir", required=False, type=click.Path(exists=True, file_okay=False))
@click.argument("name", required=False)
@click.option("--param", "-p", "params", multiple=True, metavar="KEY=VALUE", help="A query parameter (repeatable).")
@click.option("--list", "list_", is_flag=True, help="List the named queries with their parameters.")
@click.option("--format", "fmt", type=_FORMATS, default="table", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="Write the result to a file.")
def query(atlas_dir, name, params, list_, fmt, out):
    """Run a named query of the SQL library (queries/NAME.sql) on an atlas."""
    import duckdb

    from atlas.query import Atlas, QueryError, get_query, list_queries
    from atlas.store.catalog import AtlasError

    if list_ or not name:
        for q in list_queries().values():
            click.echo(f"{q.name}\n    {q.answers}")
            for p in q.params.values():
                click.echo(f"    --param {p.name}=<{p.type}>  (default {p.default}) {p.doc}")
        if not list_:
            click.echo("\nusage: atlas query ATLAS_DIR NAME [--param key=value ...]")
        return
    if not atlas_dir:
        _fail("give the atlas folder: atlas query ATLAS_DIR NAME")
    given = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep:
            _fail(f"--param takes KEY=VALUE, got {item!r}")
        given[key.strip()] = value
    try:
        get_query(name)
        frame = Atlas(atlas_dir).query(name, **given)
    except (QueryError, AtlasError, duckdb.Error) as e:
        _fail(str(e))
    _print_frame(frame, fmt, out)


def _train_options(f):
    """Options of `atlas train-transcoders`; unset ones take TrainConfig's defaults (the paper's recipe)."""
    opts = [
        click.option("--model", help="Hub id, local folder, or built-in ('toy', the default; 'tiny')."),
        click.option("--revision", help="Hub revision of the model."),
        click.option("--prompts", required=True, type=click.Path(dir_okay=False), help="Training prompt file."),
        click.option("--out", required=True, type=click.Path(file_okay=False),
                     help="Output folder: published layout + training.json; .train-state/ makes reruns resume."),
        click.option("--layers", help="Comma-separated double-stream block indices (default: all)."),
        click.option("--streams", help="Comma-separated streams: img,txt (default: both)."),
        click.option("--role", type=click.Choice(["transcoder", "sae"]),
                     help="transcoder: MLP input -> output (default); sae: MLP output -> output."),
        click.option("--expansion-factor", type=int, help="d_feat / d_model (default 16)."),
        click.option("--time-embed-dim", type=int, help="Sinusoidal time-embedding size T (default 256)."),
        click.option("--l1-img", type=float, help="L1 coefficient, image stream (default 3e-4)."),
        click.option("--l1-txt", type=float, help="L1 coefficient, text stream (default 5e-5)."),
        click.option("--batch-size", type=int, help="Rows per layer and stream per step (default 4096)."),
        click.option("--lr", type=float, help="AdamW peak learning rate, cosine-annealed to 0 (default 2e-4)."),
        click.option("--steps", type=int, help="Optimiser steps (default 1000)."),
        click.option("--seed", type=int, help="Seed of init, prompt order, noise and shuffling (default 0)."),
        click.option("--buffer-gb", type=float, help="Host memory budget of all activation buffers, GB (default 2)."),
        click.option("--reuse", type=int, help="Passes over each harvested row (default 1, the recipe)."),
        click.option("--gen-batch-size", type=int, help="Prompts per pipeline call while harvesting (default 64)."),
        click.option("--checkpoint-every", type=int, help="Steps between resumable checkpoints (default 100)."),
        click.option("--eval-prompts", type=click.Path(dir_okay=False),
                     help="Held-out evaluation prompts (default: hold out --holdout of --prompts)."),
        click.option("--holdout", type=float, help="Fraction of --prompts held out for evaluation (default 0.1)."),
        click.option("--eval-limit", type=int, help="Evaluation prompts used at most (default 64)."),
        click.option("--no-eval", is_flag=True, help="Skip the evaluation at the end."),
        click.option("--atlas", type=click.Path(file_okay=False), help="Atlas folder to store the evaluation in."),
        click.option("--device", help="auto (default), cpu, cuda, cuda:1 ..."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Pipeline dtype."),
        click.option("--no-progress", is_flag=True, help="No progress bar."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@main.command("train-transcoders")
@_train_options
def train_transcoders_cmd(layers, streams, no_eval, no_progress, **options):
    """Train transcoders (or SAEs) on activations harvested from generations (DifFRACT recipe)."""
    _quiet_libraries()
    from atlas.ingest.prompts import PromptFileError
    from atlas.model import ModelLoadError
    from atlas.store.catalog import AtlasError
    from atlas.transcoders.metrics import format_metrics
    from atlas.transcoders.training import TrainConfig, TrainConfigError, TrainingDivergedError, train_transcoders

    try:
        set_options = {k: v for k, v in options.items() if v is not None}
        if layers is not None:
            set_options["layers"] = _int_list(layers, "layers")
        if streams is not None:
            set_options["streams"] = [s.strip() for s in streams.split(",") if s.strip()]
        cfg = TrainConfig(evaluate=not no_eval, **set_options)
        result = train_transcoders(cfg, progress=not no_progress)
    except (ConfigError, TrainConfigError, PromptFileError, ModelLoadError, AtlasError, TrainingDivergedError) as e:
        _fail(str(e))
    tp = result.throughput
    resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
    click.echo(f"{len(result.modules)} {cfg.role}(s) written to {result.folder}{resumed}")
    click.echo(f"{tp['steps_run']} steps in {tp['seconds']:.1f} s ({tp['harvest_seconds']:.1f} s harvesting), "
               f"{tp['rows_per_second'] or 0:.0f} rows/s; buffer {tp['buffer_bytes'] / 1e9:.3f} GB of "
               f"{tp['buffer_budget_bytes'] / 1e9:.3f} GB budget")
    if result.evaluation is not None:
        click.echo(format_metrics(result.evaluation))
        if cfg.atlas:
            click.echo(f"metrics stored in {cfg.atlas} (tables transcoder_metrics, transcoder_set_metrics)")


@main.command("eval-transcoders")
@click.option("--model", default="toy", show_default=True, help="Hub id, local folder or built-in.")
@click.option("--revision", help="Hub revision of the model.")
@click.option("--transcoders", required=True, help="Folder or hub repo in the published DifFRACT layout, or built-in 'toy'.")
@click.option("--prompts", required=True, type=click.Path(dir_okay=False), help="Held-out evaluation prompts.")
@click.option("--atlas", type=click.Path(file_okay=False), help="Atlas folder to store the metrics in (created if missing).")
@click.option("--role", type=click.Choice(["transcoder", "sae"]), help="Default: the layout folder present.")
@click.option("--layers", help="Comma-separated layers (default: every layer found).")
@click.option("--streams", default="img,txt", show_default=True)
@click.option("--limit", type=int, default=64, show_default=True, help="Evaluate on the first N prompts.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Generations per pipeline call.")
@click.option("--seed", type=int, default=0, show_default=True, help="Noise seed of the first prompt (then +1 each).")
@click.option("--expansion-factor", type=int, help="Default: the folder's manifest.json, else 16.")
@click.option("--time-embed-dim", type=int, help="Default: the folder's manifest.json, else 256.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--no-progress", is_flag=True)
def eval_transcoders_cmd(layers, streams, device, no_progress, **options):
    """Fidelity of a transcoder set: FVU, explained variance, L0, dead fraction per step; end-to-end."""
    _quiet_libraries()
    from atlas.ingest.prompts import PromptFileError
    from atlas.model import ModelLoadError
    from atlas.store.catalog import AtlasError
    from atlas.transcoders import CheckpointError
    from atlas.transcoders.metrics import evaluate_folder, format_metrics

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        result = evaluate_folder(
            layers=_int_list(layers, "layers") if layers else None,
            streams=[s.strip() for s in streams.split(",") if s.strip()], device=device,
            progress=not no_progress, **options)
    except (ConfigError, PromptFileError, ModelLoadError, AtlasError, CheckpointError, FileNotFoundError,
            ValueError) as e:
        _fail(str(e))
    click.echo(format_metrics(result))
    if options.get("atlas"):
        click.echo(f"metrics stored in {options['atlas']} (tables transcoder_metrics, transcoder_set_metrics)")


@main.command()
@click.argument("atlas_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--target", "targets", multiple=True, required=True,
              help="Target spec (repeatable): L2.img.17[@top|@sum|@POS], topN[:L2,3][:img|txt], file:FEATURES.txt, "
                   "output:REGION:DIRECTION (REGION all | rows=A-B,cols=C-D | patches=I,J | mask=FILE; "
                   "DIRECTION self | rgb=R,G,B | dir=v1,...).")
@click.option("--steps", default="0", show_default=True, help="Comma-separated denoising step indices.")
@click.option("--prompt-ids", help="Comma-separated prompt ids of the run (default: all).")
@click.option("--where", help="SQL condition over the prompts table, e.g. \"text LIKE '%red%'\".")
@click.option("--limit", type=int, help="At most N prompts (after --prompt-ids / --where).")
@click.option("--max-feature-nodes", type=int, default=1000, show_default=True, help="Feature rows expanded per graph.")
@click.option("--batch-size", type=int, help="Adjacency rows per backward pass (default: 256 on GPU, 32 on CPU).")
@click.option("--node-threshold", type=float, default=0.8, show_default=True)
@click.option("--edge-threshold", type=float, default=0.98, show_default=True)
@click.option("--faithfulness-k", type=int, default=10, show_default=True, help="Features ablated per graph (0: skip).")
@click.option("--dtype", type=click.Choice(["auto", "float64", "float32"]), default="auto", show_default=True,
              help="Attribution dtype (auto: float64 on CPU, float32 on GPU).")
@click.option("--device", default="auto", show_default=True)
@click.option("--run-id", help="Ingest run to trace (default: the latest).")
@click.option("--threads", type=int, help="torch intra-op threads (1 is fastest on a busy small CPU).")
@click.option("--no-progress", is_flag=True)
def trace(atlas_dir, targets, steps, prompt_ids, where, limit, max_feature_nodes, batch_size, node_threshold,
          edge_threshold, faithfulness_k, dtype, device, run_id, threads, no_progress):
    """Compute attribution graphs for chosen targets and store them in the atlas (resumable)."""
    _quiet_libraries()
    import torch

    from atlas.attribution.trace import TraceConfig, TraceError, run_trace
    from atlas.store.catalog import AtlasError

    if threads:
        torch.set_num_threads(threads)
    try:
        cfg = TraceConfig(targets=list(targets), steps=_int_list(steps, "steps"),
                          prompt_ids=_int_list(prompt_ids, "prompt-ids") if prompt_ids else None, where=where,
                          limit=limit, max_feature_nodes=max_feature_nodes, batch_size=batch_size,
                          node_threshold=node_threshold, edge_threshold=edge_threshold, faithfulness_k=faithfulness_k,
                          dtype=dtype, device=device, run_id=run_id)
        result = run_trace(atlas_dir, cfg, progress=not no_progress)
    except (TraceError, AtlasError, ConfigError) as e:
        _fail(str(e))
    click.echo(
        f"run {result.run_id}: {result.graphs_new} new graph(s) ({result.empty} empty, {result.errors} failed), "
        f"{result.graphs_skipped} already in the atlas, {result.graphs_total} in total"
    )
    click.echo(f"query them: atlas sql {atlas_dir} \"SELECT graph_id, prompt_id, step, target_key, status, n_nodes, "
               "n_edges, conservation_error, replacement_score FROM graphs\"")


@main.command("export-graph")
@click.argument("atlas_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("graph_id")
@click.option("--format", "fmt", type=click.Choice(["circuit-tracer", "difract"]), default="circuit-tracer",
              show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="JSON file to write.")
def export_graph_cmd(atlas_dir, graph_id, fmt, out):
    """Write one stored graph as circuit-tracer/Neuronpedia JSON or DifFRACT v2 JSON."""
    from atlas.attribution.export import ExportError, export_graph
    from atlas.store.catalog import AtlasError

    try:
        path = export_graph(atlas_dir, graph_id, fmt, out)
    except (ExportError, AtlasError) as e:
        _fail(str(e))
    click.echo(f"wrote {path}")


@main.command()
@click.argument("atlas_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Report folder (default: ATLAS_DIR/report).")
@click.option("--examples-per-step", type=int, default=5, show_default=True,
              help="Top-activating examples shown per feature and denoising step.")
@click.option("--max-feature-pages", type=int, default=None,
              help="At most N feature pages per layer and stream (the most frequent and the strongest, plus "
                   "features in graphs). Default: a page for every feature that fired.")
@click.option("--force", is_flag=True, help="Render every page even if the atlas did not change.")
@click.option("--no-progress", is_flag=True)
def report(atlas_dir, out, examples_per_step, max_feature_pages, force, no_progress):
    """Render the atlas as a static HTML site (opens from the file system; only changed pages are rewritten)."""
    import duckdb

    from atlas.report import ReportDirError, render_report
    from atlas.store.catalog import AtlasError

    try:
        result = render_report(atlas_dir, out, force=force, examples_per_step=examples_per_step,
                               max_feature_pages=max_feature_pages, progress=not no_progress)
    except (AtlasError, ReportDirError) as e:
        _fail(str(e))
    except duckdb.Error as e:
        _fail(f"cannot read {atlas_dir} (an atlas written by an older version of the schema?): {e}")
    click.echo(result.summary())
    click.echo(f"open {result.index}")



@main.command("label-errors")
@click.argument("atlas_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("labels", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--oracle", is_flag=True, help="Judge the stored images with the toy world's pixel oracle (toy-grammar prompts).")
@click.option("--run-id", help="Run the labels' prompt ids refer to (default: the atlas's only run).")
@click.option("--skip-bad", is_flag=True, help="Import the good lines of a labels file even if some are bad (they are listed).")
def label_errors(atlas_dir, labels, oracle, run_id, skip_bad):
    """Fill the generation_errors table from a labels file (CSV/JSONL) or the toy oracle.

    LABELS has one row per error (prompt_id, error_type and optionally run_id, object_index, object,
    attribute, expected, observed, note, text); error_type none/correct marks a generation checked and
    found correct. Bad lines and unknown prompt ids are reported by line number and nothing is changed,
    unless --skip-bad.
    """
    from atlas.query.errors import LabelError, OracleUnavailable, check_with_oracle, import_labels
    from atlas.store.catalog import AtlasError

    if bool(labels) == bool(oracle):
        _fail("give a labels file or --oracle (one of them)")
    try:
        if oracle:
            res = check_with_oracle(atlas_dir, run_id=run_id)
        else:
            res = import_labels(atlas_dir, labels, run_id=run_id, skip_bad=skip_bad)
    except (LabelError, OracleUnavailable, AtlasError, ValueError) as e:
        _fail(str(e))
    for prob in res.skipped:
        click.echo(f"skipped line {prob.line}: {prob.message}", err=True)
    extra = f", {res.unjudged} prompt(s) outside the toy grammar not judged" if oracle else ""
    click.echo(f"{res.source}: {res.rows_written} row(s) for {res.generations} generation(s) "
               f"({res.errors} with errors, {res.correct} correct){extra}")
    click.echo(f"compare them: atlas query {atlas_dir} error_explanations   (and error_edges, generation_errors)")


@main.command()
@click.argument("atlas_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--run-id", help="Analyse one run (default: all runs).")
@click.option("--regions", type=click.Choice(["auto", "none"]), default="auto", show_default=True,
              help="auto: ground-truth object regions for toy-grammar prompts; none: always find objects from noun features.")
@click.option("--no-supernodes", is_flag=True, help="Skip grouping features into supernodes.")
@click.option("--min-similarity", type=float, default=0.8, show_default=True, help="Supernodes: role cosine to link two features.")
@click.option("--min-shared-dims", type=int, default=2, show_default=True, help="Supernodes: shared neighbours to link two features.")
@click.option("--min-support", type=int, default=2, show_default=True, help="Supernodes: graphs a feature must appear in.")
@click.option("--max-features", type=int, default=500, show_default=True, help="Supernodes: most recurring features considered per run.")
@click.option("--any-layer", is_flag=True, help="Supernodes: also link features of different layers.")
def analyze(atlas_dir, run_id, regions, no_supernodes, min_similarity, min_shared_dims, min_support, max_features,
            any_layer):
    """Fill the derived tables the analysis queries read: binding pairs/regions and supernodes (torch-free)."""
    import duckdb

    from atlas.analysis import analyze as run_analyze
    from atlas.store.catalog import AtlasError

    try:
        res = run_analyze(atlas_dir, run_id=run_id, regions=regions, supernodes=not no_supernodes,
                          min_similarity=min_similarity, min_shared_dims=min_shared_dims, min_support=min_support,
                          max_features=max_features, same_layer=not any_layer)
    except (AtlasError, ValueError, duckdb.Error) as e:
        _fail(str(e))
    b = res.binding
    click.echo(f"binding: {b['pairs']} attribute-object pair(s) in {b['with_pairs']} of {b['prompts']} prompt(s) "
               f"({b['ground_truth']} with ground-truth regions; {b['not_two_pairs']} not two-object prompts, "
               f"{b['not_located']} not found among the stored tokens)")
    if not no_supernodes:
        click.echo(f"supernodes: {res.supernodes} group(s)")
    click.echo(f"query them: atlas query {atlas_dir} attribute_binding | binding_features | recurring_circuits | supernodes")


if __name__ == "__main__":
    main()
