"""The atlas schema: the one definition of every table, its columns and types.

An atlas is a folder holding ``atlas.duckdb`` (the catalog: small tables and views) and
``facts/<table>/...parquet`` (large, hive-partitioned fact tables). Both kinds of table are
declared here; DDL, Parquet (pyarrow) schemas and the catalog's views are generated from these
declarations, so a column is named and typed in exactly one place.

Bump ``SCHEMA_VERSION`` whenever a declaration changes: an atlas written under another version is
refused rather than silently misread.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

SCHEMA_VERSION = 1

# DuckDB type -> pyarrow type, for the types the fact tables use.
_ARROW = {
    "TINYINT": pa.int8(),
    "SMALLINT": pa.int16(),
    "INTEGER": pa.int32(),
    "BIGINT": pa.int64(),
    "FLOAT": pa.float32(),
    "DOUBLE": pa.float64(),
    "VARCHAR": pa.string(),
    "BOOLEAN": pa.bool_(),
}


@dataclass(frozen=True)
class Table:
    """One table of the atlas.

    ``columns`` are ``(name, duckdb_type, description)``. For fact tables, ``partition_by`` names
    the leading columns that live in the hive path (``facts/<name>/run_id=.../layer=.../...``)
    rather than inside the Parquet files, and ``committed_only`` makes the catalog's view show only
    rows of batches recorded in ``batches`` (the commit log), so files of a batch that was killed
    before its commit are never visible.
    """

    name: str
    doc: str
    columns: tuple[tuple[str, str, str], ...]
    primary_key: tuple[str, ...] = ()
    fact: bool = False
    partition_by: tuple[str, ...] = ()
    committed_only: bool = False

    @property
    def column_names(self) -> list[str]:
        return [c[0] for c in self.columns]

    def ddl(self) -> str:
        """``CREATE TABLE IF NOT EXISTS`` statement for a catalog table."""
        cols = [f"{n} {t}" for n, t, _ in self.columns]
        if self.primary_key:
            cols.append(f"PRIMARY KEY ({', '.join(self.primary_key)})")
        return f"CREATE TABLE IF NOT EXISTS {self.name} (\n  " + ",\n  ".join(cols) + "\n)"

    def file_columns(self) -> list[tuple[str, str, str]]:
        """Columns stored inside the Parquet files (all but the hive partition columns)."""
        return [c for c in self.columns if c[0] not in self.partition_by]

    def arrow_schema(self) -> pa.Schema:
        """pyarrow schema of this fact table's Parquet files (partition columns excluded)."""
        return pa.schema([(n, _ARROW[t]) for n, t, _ in self.file_columns()])


def _cols(*specs: str) -> tuple[tuple[str, str, str], ...]:
    """Parse ``"name TYPE | description"`` strings into column triples."""
    out = []
    for spec in specs:
        head, _, doc = spec.partition("|")
        name, typ = head.split(maxsplit=1)
        out.append((name.strip(), typ.strip(), doc.strip()))
    return tuple(out)


TABLES: dict[str, Table] = {
    t.name: t
    for t in [
        Table(
            "atlas_meta",
            "Key/value facts about the atlas folder itself (schema_version, created_at).",
            _cols("key VARCHAR", "value VARCHAR"),
            primary_key=("key",),
        ),
        Table(
            "runs",
            "One row per ingest run, with its full provenance.",
            _cols(
                "run_id VARCHAR | short id, also the hive partition value of the fact tables",
                "config_json VARCHAR | the full resolved run configuration (JSON)",
                "config_hash VARCHAR | sha256 of the result-determining part of the config",
                "model_id VARCHAR | hub id, local folder or built-in name",
                "model_revision VARCHAR | hub commit hash when known",
                "model_json VARCHAR | architecture facts (blocks, d_model, vae scale) as JSON",
                "transcoder_source VARCHAR | folder, hub repo id or 'random-init:<seed>'",
                "transcoder_checksums VARCHAR | JSON {key: sha256}",
                "versions_json VARCHAR | torch/diffusers/transformers/atlas/python versions",
                "host VARCHAR | machine and device that ran it",
                "started_at TIMESTAMP",
                "finished_at TIMESTAMP",
                "status VARCHAR | running, complete or failed",
                "n_prompts INTEGER | generations committed",
            ),
            primary_key=("run_id",),
        ),
        Table(
            "batches",
            "Commit log: a batch's fact files become visible once its row is here.",
            _cols("run_id VARCHAR", "batch_id INTEGER", "n_prompts INTEGER", "committed_at TIMESTAMP"),
            primary_key=("run_id", "batch_id"),
        ),
        Table(
            "prompts",
            "One row per generation (a prompt line and a seed).",
            _cols(
                "run_id VARCHAR",
                "prompt_id INTEGER | line_index * n_seeds + seed_index",
                "text VARCHAR | the prompt as read (CR stripped)",
                "seed BIGINT | torch.Generator seed of the initial latent noise",
                "source_file VARCHAR",
                "source_line INTEGER | 1-based line number in source_file",
                "n_tokens INTEGER | T5 tokens kept (incl. end-of-sequence), i.e. text positions stored",
                "n_tokens_full INTEGER | T5 tokens before truncation",
                "truncated BOOLEAN | longer than max_sequence_length and cut",
                "batch_id INTEGER",
            ),
            primary_key=("run_id", "prompt_id"),
        ),
        Table(
            "prompt_tokens",
            "T5 token strings of each prompt by text-stream position (padding excluded).",
            _cols("run_id VARCHAR", "prompt_id INTEGER", "position SMALLINT", "token_id INTEGER", "token VARCHAR"),
            primary_key=("run_id", "prompt_id", "position"),
        ),
        Table(
            "images",
            "Generated images (PNG files under images/, path relative to the atlas folder).",
            _cols("run_id VARCHAR", "prompt_id INTEGER", "path VARCHAR", "height INTEGER", "width INTEGER", "sha256 VARCHAR"),
            primary_key=("run_id", "prompt_id"),
        ),
        Table(
            "transcoders",
            "Transcoders (or SAEs) a run used, one per (layer, stream).",
            _cols(
                "run_id VARCHAR",
                "layer INTEGER | double-stream block index",
                "stream VARCHAR | img or txt",
                "role VARCHAR | transcoder (MLP in -> out) or sae (MLP out -> out)",
                "d_model INTEGER",
                "d_feat INTEGER",
                "time_embed_dim INTEGER",
                "checksum VARCHAR | sha256 of the state dict (file sha256 for loaded files)",
                "source VARCHAR",
            ),
            primary_key=("run_id", "layer", "stream"),
        ),
        Table(
            "feature_step_stats",
            "Per feature and denoising step statistics over all committed generations of a run.",
            _cols(
                "run_id VARCHAR",
                "layer INTEGER",
                "stream VARCHAR",
                "step TINYINT | denoising step index, 0 = first (noisiest)",
                "sigma FLOAT | noise level the transcoder saw at this step",
                "feature INTEGER",
                "firing_count BIGINT | positions with z > activation_threshold",
                "density DOUBLE | firing_count / positions seen in this stream and step",
                "mean_activation DOUBLE | mean z over firing positions",
                "max_activation FLOAT",
                "hist_counts INTEGER[] | activation histogram, n equal bins over (0, max_activation]",
            ),
            primary_key=("run_id", "layer", "stream", "step", "feature"),
        ),
        Table(
            "features",
            "Per feature statistics over all steps (features that fired at least once).",
            _cols(
                "run_id VARCHAR",
                "layer INTEGER",
                "stream VARCHAR",
                "feature INTEGER",
                "firing_count BIGINT",
                "density DOUBLE | firing_count / positions seen over all steps",
                "mean_activation DOUBLE",
                "max_activation FLOAT",
                "n_prompts INTEGER | generations in which it fired",
                "label VARCHAR | human or automatic label, NULL until labelled",
            ),
            primary_key=("run_id", "layer", "stream", "feature"),
        ),
        Table(
            "transcoder_metrics",
            "Fidelity of a transcoder (or SAE) on an evaluation prompt set, per denoising step.",
            _cols(
                "checksum VARCHAR | transcoder_checksum of the evaluated module",
                "source VARCHAR | folder, hub repo id or random-init description",
                "layer INTEGER",
                "stream VARCHAR",
                "role VARCHAR | transcoder or sae",
                "d_feat INTEGER",
                "step TINYINT | denoising step index; NULL = all steps pooled",
                "sigma FLOAT | NULL when step is NULL",
                "fvu DOUBLE | sum((y - y_hat)^2) / sum((y - mean(y))^2): nMSE, fraction of variance unexplained",
                "explained_variance DOUBLE | 1 - fvu",
                "l0 DOUBLE | mean number of features with z > 0 per position",
                "dead_fraction DOUBLE | features that never fired on the evaluation set (pooled rows only)",
                "n_rows BIGINT | positions evaluated (text padding excluded)",
                "eval_prompts VARCHAR | prompt file and count",
                "model_id VARCHAR",
                "measured_at TIMESTAMP",
            ),
        ),
        Table(
            "transcoder_set_metrics",
            "End-to-end fidelity when every covered MLP is replaced by its transcoder (no error term).",
            _cols(
                "set_checksum VARCHAR | sha256 of the sorted member checksums",
                "source VARCHAR",
                "role VARCHAR",
                "members VARCHAR | JSON list of keys like img_6",
                "latent_mse DOUBLE | final latent, replaced vs original pipeline",
                "latent_cosine DOUBLE",
                "image_psnr DOUBLE | dB, decoded images in [0, 1]",
                "n_prompts INTEGER",
                "eval_prompts VARCHAR",
                "model_id VARCHAR",
                "measured_at TIMESTAMP",
            ),
        ),
        Table(
            "activations",
            "Sparse transcoder codes: one row per (generation, step, position, feature) with z > threshold.",
            _cols(
                "run_id VARCHAR",
                "layer INTEGER",
                "stream VARCHAR",
                "batch_id INTEGER",
                "prompt_id INTEGER",
                "step TINYINT",
                "sigma FLOAT",
                "position SMALLINT | token index in its stream (image: row-major patch index)",
                "feature INTEGER",
                "value FLOAT | z = relu(pre-activation)",
            ),
            fact=True,
            partition_by=("run_id", "layer", "stream"),
            committed_only=True,
        ),
        Table(
            "top_examples",
            "Exact top-k generations per feature and step (each with its strongest position).",
            _cols(
                "run_id VARCHAR",
                "layer INTEGER",
                "stream VARCHAR",
                "step TINYINT",
                "sigma FLOAT",
                "feature INTEGER",
                "rank SMALLINT | 1 = strongest",
                "prompt_id INTEGER",
                "position SMALLINT",
                "value FLOAT",
                "token VARCHAR | text stream: the token at position",
                "x0 SMALLINT | image stream: pixel box of the patch (x0, y0, x1, y1), exclusive end",
                "y0 SMALLINT",
                "x1 SMALLINT",
                "y1 SMALLINT",
            ),
            fact=True,
            partition_by=("run_id", "layer", "stream"),
        ),
    ]
}

CATALOG_TABLES = [t for t in TABLES.values() if not t.fact]
FACT_TABLES = [t for t in TABLES.values() if t.fact]
