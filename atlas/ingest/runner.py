"""`atlas ingest`: prompts -> FLUX pipeline with transcoders -> atlas tables, batched and resumable.

A batch is: generate B images with the MLPs of the chosen double-stream layers captured at every
denoising step, encode the captures with the transcoders into sparse codes, write one Parquet
file per (layer, stream) and the images, then commit the batch's catalog rows (prompts, tokens,
images, the ``batches`` commit-log row) in one DuckDB transaction. A run killed at any point
leaves only whole batches visible; rerunning the same command removes the leftovers and goes on
with the prompts not yet committed. The derived tables (feature statistics, top examples) are
recomputed from the committed activations when the run ends.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import atlas
from atlas.ingest.config import ConfigError, RunConfig, config_from_json
from atlas.ingest.encode import SparseCodes
from atlas.ingest.prompts import Prompt, read_prompts
from atlas.ingest.transcoder_setup import setup_transcoders
from atlas.model import MLPCapture, describe_pipeline, load_pipeline, recommended_settings, validate_layers_streams
from atlas.store.catalog import AtlasError, catalog_path, connect, create_atlas, insert_rows, refresh_views, transaction
from atlas.store.facts import batch_file_name, remove_uncommitted, write_partition
from atlas.store.stats import finalize_run
from atlas.transcoders import file_sha256

log = logging.getLogger("atlas.ingest")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class IngestResult:
    """What a call to :func:`run_ingest` did."""

    atlas_dir: Path
    run_id: str
    generations_total: int
    generations_new: int
    blank_lines: int
    truncated: int
    resumed: bool


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)


def _resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _choose_run(atlas_dir: Path, cfg: RunConfig, new_run: bool, resume: bool) -> tuple[str | None, RunConfig]:
    """Find the run this invocation continues, or decide on a new one (run_id None).

    Same config hash as an existing run: continue it. Another config: refused unless ``new_run``
    (start a second run in this atlas) or ``resume`` (continue the latest run with *its* stored
    config; only limit, batch size and device are taken from this invocation).
    """
    with connect(atlas_dir, read_only=True) as con:
        runs = con.execute(
            "SELECT run_id, config_hash, config_json FROM runs ORDER BY started_at"
        ).fetchall()
    if new_run:
        return None, cfg
    for run_id, config_hash, _ in runs:
        if config_hash == cfg.config_hash():
            return run_id, cfg
    if not runs:
        return None, cfg
    run_id, _, stored_json = runs[-1]
    stored = config_from_json(stored_json)
    if resume:
        stored.limit, stored.batch_size, stored.device, stored.out = cfg.limit, cfg.batch_size, cfg.device, cfg.out
        return run_id, stored
    diff = "\n".join(f"  {k}: atlas has {b!r}, this command has {a!r}" for k, (a, b) in cfg.differences(stored).items())
    raise AtlasError(
        f"{atlas_dir} already holds run {run_id} with a different configuration:\n{diff}\n"
        "Nothing was changed. Use --resume to continue that run with its own configuration, "
        "--new-run to add a second run to this atlas, or --out for a new atlas."
    )


def _versions() -> dict:
    import diffusers
    import duckdb
    import transformers

    return {
        "atlas": atlas.__version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__, "duckdb": duckdb.__version__,
    }


def run_ingest(cfg: RunConfig, *, new_run: bool = False, resume: bool = False, progress: bool = True) -> IngestResult:
    """Ingest a prompt file into an atlas; see the module docstring for the batch protocol.

    Raises:
        ConfigError: invalid configuration, unknown layer or stream (listing the available ones).
        PromptFileError: unreadable or malformed prompt file (with the line number).
        AtlasError: the atlas has another schema version, or another run config (see
            ``new_run``/``resume``). In every case nothing already written is changed.
    """
    cfg.validate()
    prompt_set = read_prompts(cfg.prompts, limit=cfg.limit)
    cfg.prompts_sha256 = file_sha256(cfg.prompts)
    if prompt_set.blank_lines:
        log.info("skipped %d blank line(s) in %s", prompt_set.blank_lines, cfg.prompts)
    atlas_dir = Path(cfg.out).resolve()
    if catalog_path(atlas_dir).exists():  # refuse a mismatching atlas before any work
        run_id, cfg = _choose_run(atlas_dir, cfg, new_run, resume)
    elif atlas_dir.exists() and any(atlas_dir.iterdir()):
        raise AtlasError(f"{atlas_dir} exists, is not empty and holds no atlas.duckdb; choose another --out")
    else:
        run_id = None
    resumed = run_id is not None
    if resumed and Path(cfg.prompts).resolve() != prompt_set.path.resolve():
        prompt_set = read_prompts(cfg.prompts, limit=cfg.limit)

    settings = recommended_settings(cfg.model)
    steps = cfg.steps or settings["num_inference_steps"]
    height, width = cfg.height or settings["height"], cfg.width or settings["width"]
    guidance = settings["guidance_scale"] if cfg.guidance_scale is None else cfg.guidance_scale
    max_seq = cfg.max_sequence_length or settings["max_sequence_length"]
    device = _resolve_device(cfg.device)
    if cfg.dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {list(_DTYPES)}, not {cfg.dtype!r}")

    pipe = load_pipeline(cfg.model, device=device, dtype=_DTYPES[cfg.dtype], revision=cfg.revision)
    n_blocks = len(pipe.transformer.transformer_blocks)
    layers = list(range(n_blocks)) if cfg.layers is None else list(cfg.layers)
    try:
        validate_layers_streams(pipe.transformer, layers, cfg.streams)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    model_info = describe_pipeline(pipe, cfg.model)
    patch_px = pipe.vae_scale_factor * 2
    if height % patch_px or width % patch_px:
        raise ConfigError(f"height and width must be multiples of {patch_px} pixels for this model, got {height}x{width}")
    grid_w, image_tokens = width // patch_px, (height // patch_px) * (width // patch_px)
    gen = dict(height=height, width=width, num_inference_steps=steps, guidance_scale=guidance, max_sequence_length=max_seq)

    transcoders, tc_rows, tc_source = setup_transcoders(cfg, pipe, layers, gen, device)
    create_atlas(atlas_dir)

    if run_id is None:
        run_id = f"{_now():%Y%m%d-%H%M%S}-{cfg.config_hash()[:6]}"
        resolved = {**cfg.to_dict(), "layers": layers, "resolved_generation": gen}
        with connect(atlas_dir) as con, transaction(con):
            insert_rows(con, "runs", [{
                "run_id": run_id, "config_json": json.dumps(cfg.to_dict()), "config_hash": cfg.config_hash(),
                "model_id": cfg.model, "model_revision": model_info.get("revision"),
                "model_json": json.dumps({**model_info, "resolved": resolved}, default=str),
                "height": height, "width": width, "patch_px": patch_px, "n_steps": steps,
                "transcoder_source": tc_source,
                "transcoder_checksums": json.dumps({r["stream"] + "_" + str(r["layer"]): r["checksum"] for r in tc_rows}),
                "versions_json": json.dumps(_versions()), "host": f"{platform.node()} ({device})",
                "started_at": _now(), "status": "running", "n_prompts": 0,
            }])
            insert_rows(con, "transcoders", [{**r, "run_id": run_id} for r in tc_rows])

    with connect(atlas_dir) as con:
        con.execute("UPDATE runs SET status = 'running' WHERE run_id = ?", [run_id])
        committed = {b for (b,) in con.execute("SELECT batch_id FROM batches WHERE run_id = ?", [run_id]).fetchall()}
        done = {p for (p,) in con.execute("SELECT prompt_id FROM prompts WHERE run_id = ?", [run_id]).fetchall()}
        if removed := remove_uncommitted(atlas_dir, run_id, committed):
            log.info("removed %d file(s) of uncommitted batches left by an interrupted run", removed)
        refresh_views(con, atlas_dir)

    generations = [
        (i * len(cfg.seeds) + j, prompt, seed)
        for i, prompt in enumerate(prompt_set.prompts)
        for j, seed in enumerate(cfg.seeds)
    ]
    todo = [g for g in generations if g[0] not in done]
    next_batch = max(committed, default=-1) + 1
    truncated = 0
    bar = tqdm(total=len(generations), initial=len(generations) - len(todo), unit="gen",
               desc=f"ingest {run_id}", disable=not progress)
    for start in range(0, len(todo), cfg.batch_size):
        chunk = todo[start : start + cfg.batch_size]
        truncated += _ingest_batch(pipe, transcoders, chunk, next_batch, run_id, atlas_dir, layers, cfg, gen, bar)
        next_batch += 1
        bar.update(len(chunk))
    bar.close()

    with connect(atlas_dir) as con:
        bar_desc = "computing feature statistics and top examples"
        log.info(bar_desc)
        finalize_run(con, atlas_dir, run_id, image_tokens=image_tokens, grid_w=grid_w, patch_px=patch_px,
                     n_steps=steps, top_k=cfg.top_k, bins=cfg.histogram_bins)
        con.execute(
            "UPDATE runs SET status = 'complete', finished_at = ?, "
            "n_prompts = (SELECT count(*) FROM prompts WHERE run_id = ?) WHERE run_id = ?",
            [_now(), run_id, run_id],
        )
    return IngestResult(atlas_dir, run_id, len(generations), len(todo), prompt_set.blank_lines, truncated, resumed)


def _tokenize(pipe, texts: list[str], max_seq: int):
    """T5 token ids per prompt (padding removed), their full untruncated counts."""
    tok = pipe.tokenizer_2
    kept = tok(texts, padding="max_length", max_length=max_seq, truncation=True)
    full = tok(texts, truncation=False)
    ids = [[t for t, m in zip(row, mask) if m] for row, mask in zip(kept["input_ids"], kept["attention_mask"])]
    return ids, [len(r) for r in full["input_ids"]]


def _ingest_batch(pipe, transcoders, chunk: list[tuple[int, Prompt, int]], batch_id: int, run_id: str,
                  atlas_dir: Path, layers: list[int], cfg: RunConfig, gen: dict, bar) -> int:
    """Generate, encode, write and commit one batch; returns how many prompts were truncated."""
    texts = [p.text for _, p, _ in chunk]
    ids, full_lengths = _tokenize(pipe, texts, gen["max_sequence_length"])
    n_truncated = 0
    for (_, prompt, _), kept, full in zip(chunk, ids, full_lengths):
        if full > len(kept):
            n_truncated += 1
            bar.write(f"warning: {prompt.source_file}:{prompt.source_line}: prompt has {full} T5 tokens, "
                      f"truncated to {len(kept)} (max_sequence_length {gen['max_sequence_length']})")
    codes = SparseCodes(transcoders, [g[0] for g in chunk], [len(k) for k in ids], cfg.activation_threshold)
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for _, _, seed in chunk]
    with MLPCapture(pipe.transformer, layers, cfg.streams, on_step=codes.add_step):
        images = pipe(prompt=texts, generator=generators, output_type="pil", **gen).images

    image_rows = []
    img_dir = atlas_dir / "images" / run_id
    img_dir.mkdir(parents=True, exist_ok=True)
    for (prompt_id, _, _), image in zip(chunk, images):
        rel = f"images/{run_id}/{prompt_id:06d}.png"
        tmp = atlas_dir / (rel + ".tmp")
        image.save(tmp, format="PNG")
        data = tmp.read_bytes()
        tmp.replace(atlas_dir / rel)
        image_rows.append({"run_id": run_id, "prompt_id": prompt_id, "path": rel, "height": image.height,
                           "width": image.width, "sha256": hashlib.sha256(data).hexdigest()})

    for (layer, stream), columns in codes.partitions(batch_id):
        write_partition(atlas_dir, "activations", {"run_id": run_id, "layer": layer, "stream": stream},
                        columns, batch_file_name(batch_id))

    tok = pipe.tokenizer_2
    prompt_rows, token_rows = [], []
    for (prompt_id, prompt, seed), kept, full in zip(chunk, ids, full_lengths):
        prompt_rows.append({"run_id": run_id, "prompt_id": prompt_id, "text": prompt.text, "seed": int(seed),
                            "source_file": prompt.source_file, "source_line": prompt.source_line,
                            "n_tokens": len(kept), "n_tokens_full": full, "truncated": full > len(kept),
                            "batch_id": batch_id})
        for pos, (tid, tstr) in enumerate(zip(kept, tok.convert_ids_to_tokens(kept))):
            token_rows.append({"run_id": run_id, "prompt_id": prompt_id, "position": pos, "token_id": int(tid), "token": tstr})
    with connect(atlas_dir) as con, transaction(con):
        insert_rows(con, "prompts", prompt_rows)
        insert_rows(con, "prompt_tokens", token_rows)
        insert_rows(con, "images", image_rows)
        insert_rows(con, "batches", [{"run_id": run_id, "batch_id": batch_id, "n_prompts": len(chunk), "committed_at": _now()}])
        con.execute("UPDATE runs SET n_prompts = n_prompts + ? WHERE run_id = ?", [len(chunk), run_id])
        refresh_views(con, atlas_dir)
    return n_truncated
