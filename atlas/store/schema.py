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
    rather than inside the Parquet files, and ``commit_log`` = ``(table, keys)`` makes the
    catalog's view show only rows whose keys have a row in that catalog table (``batches`` for
    ingest batches, ``graphs`` for attribution graphs), so files written by a process killed
    before its commit are never visible.
    """

    name: str
    doc: str
    columns: tuple[tuple[str, str, str], ...]
    primary_key: tuple[str, ...] = ()
    fact: bool = False
    partition_by: tuple[str, ...] = ()
    commit_log: tuple[str, tuple[str, ...]] | None = None

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
                "height INTEGER | generated image height, pixels",
                "width INTEGER | generated image width, pixels",
                "patch_px INTEGER | pixels per image token side (2 x VAE scale factor); token k is patch (k // (width / patch_px), k % ...)",
                "n_steps INTEGER | denoising steps per generation",
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
            commit_log=("batches", ("run_id", "batch_id")),
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
        Table(
            "graphs",
            "Attribution graphs (one per prompt, step and target) written by `atlas trace`. A graph's "
            "graph_nodes/graph_edges files are written first and this row is committed last, so a row "
            "here means its facts are complete: the graph_nodes/graph_edges views show a graph's rows only "
            "once its row is here (files of a trace killed before its commit stay invisible and are "
            "removed by the next `atlas trace`).",
            _cols(
                "graph_id VARCHAR | sha256 prefix of run, prompt, step, target spec and rank, trace settings",
                "run_id VARCHAR",
                "prompt_id INTEGER",
                "seed BIGINT",
                "step TINYINT | denoising step index, 0 = first (noisiest)",
                "sigma FLOAT | the transformer's timestep at this step (t / 1000)",
                "target_spec VARCHAR | the --target spec this graph came from, e.g. top5:L3 or L2.img.17@top",
                "target_rank INTEGER | index of this target within its spec (0 for a single target)",
                "target_key VARCHAR | resolved target, e.g. L3.img.644@top; NULL when none was resolved",
                "target_kind VARCHAR | feature (transcoder pre-activation) or output (velocity projection)",
                "target_layer INTEGER | NULL for output targets",
                "target_stream VARCHAR",
                "target_feature INTEGER",
                "target_position SMALLINT | NULL when summed over positions or for an output region",
                "target_positions VARCHAR | JSON list of the stream positions read out",
                "target_value DOUBLE | pre-activation (feature) or projection (output) in the recording pass",
                "target_encoder_bias DOUBLE | encoder bias of the target feature (feature targets)",
                "bias_total DOUBLE | bias terms: the target read-out of the LRM with every source set to zero",
                "status VARCHAR | ok, empty (target not attributable here, see reason) or error",
                "reason VARCHAR | why a graph is empty or failed; NULL when ok",
                "max_feature_nodes INTEGER | expansion budget",
                "batch_size INTEGER | adjacency rows per backward pass",
                "node_threshold DOUBLE | node pruning: influence fraction kept",
                "edge_threshold DOUBLE | edge pruning: influence fraction kept",
                "dtype VARCHAR | attribution dtype (float64 or float32)",
                "covered_layers VARCHAR | JSON list of transcoder keys in the LRM, e.g. [\"txt_0\", \"img_0\"]",
                "height INTEGER | pixels",
                "width INTEGER | pixels",
                "s_txt INTEGER | text-stream positions (T5 tokens incl. padding)",
                "s_img INTEGER | image-stream positions (patches)",
                "n_active_features INTEGER | active features upstream of the target (expansion candidates)",
                "n_expanded INTEGER | feature rows computed for this graph",
                "n_nodes_unpruned INTEGER",
                "n_edges_unpruned BIGINT | nonzero entries of the unpruned adjacency",
                "n_nodes INTEGER | nodes stored (kept by pruning)",
                "n_edges BIGINT | edges stored (kept by pruning)",
                "conservation_error DOUBLE | |sum(incoming edges) + bias - value| / |value| of the target row",
                "conservation_error_max DOUBLE | the same, max over every adjacency row of this graph",
                "reproduction_error DOUBLE | max |LRM with errors - original output| / max |original output|",
                "replacement_score DOUBLE | unpruned graph: input influence / (input + error influence)",
                "completeness_score DOUBLE | unpruned graph: influence-weighted non-error share of inputs to nodes",
                "pruned_replacement_score DOUBLE",
                "pruned_completeness_score DOUBLE",
                "kept_node_influence DOUBLE | share of node influence kept by the node threshold",
                "kept_edge_influence DOUBLE | share of edge influence kept by the edge threshold",
                "faithfulness_k INTEGER | features ablated in the original model (0 = not measured)",
                "faithfulness_spearman DOUBLE | measured vs predicted target change over the ablated features",
                "faithfulness_pearson DOUBLE",
                "faithfulness_json VARCHAR | per-feature measured and predicted changes (JSON)",
                "time_lrm_s DOUBLE | recording pass + batched forward (shared by the graphs of a prompt and step)",
                "time_attribution_s DOUBLE | adjacency rows and expansion",
                "time_prune_s DOUBLE | influence, pruning and scores",
                "time_faithfulness_s DOUBLE",
                "time_total_s DOUBLE",
                "n_backward_passes INTEGER | backward passes made for this graph (cached rows are free)",
                "trace_config_json VARCHAR | the settings of the trace that wrote it",
                "created_at TIMESTAMP",
            ),
            primary_key=("graph_id",),
        ),
        Table(
            "graph_nodes",
            "Nodes of the stored (pruned) attribution graphs; one file per graph "
            "(facts/graph_nodes/run_id=R/graph-<graph_id>.parquet), visible once its graphs row is committed.",
            _cols(
                "run_id VARCHAR",
                "graph_id VARCHAR",
                "node INTEGER | index in the graph's unpruned node list (the target is the last)",
                "node_type VARCHAR | feature, error (MLP reconstruction error), input (embedding entering the first covered block) or target",
                "layer INTEGER | double-stream block; NULL for inputs and output targets",
                "stream VARCHAR | img or txt",
                "position SMALLINT | token index in its stream (image: row-major patch); NULL for summed/region targets",
                "ctx_idx SMALLINT | position in the joint sequence: text positions first, then image",
                "feature INTEGER | transcoder feature (feature nodes and feature targets), else NULL",
                "activation DOUBLE | z for features; value for the target; L2 norm of the error / input vector",
                "influence DOUBLE | node influence on the target: row of B = (I - A_norm)^-1 - I",
                "cumulative_influence DOUBLE | share of total influence of the nodes at least this influential",
            ),
            fact=True,
            partition_by=("run_id",),
            commit_log=("graphs", ("run_id", "graph_id")),
        ),
        Table(
            "graph_edges",
            "Edges of the stored (pruned) attribution graphs: signed direct effects source -> target "
            "in the Local Replacement Model; cross-stream edges (txt -> img, img -> txt) are flagged.",
            _cols(
                "run_id VARCHAR",
                "graph_id VARCHAR",
                "source INTEGER | graph_nodes.node of the upstream node",
                "target INTEGER | graph_nodes.node of the downstream node",
                "weight DOUBLE | edge attribution (pre-activation units of the target node)",
                "source_type VARCHAR",
                "target_type VARCHAR",
                "source_stream VARCHAR",
                "target_stream VARCHAR",
                "cross_stream BOOLEAN | source_stream != target_stream",
            ),
            fact=True,
            partition_by=("run_id",),
            commit_log=("graphs", ("run_id", "graph_id")),
        ),
        Table(
            "generation_errors",
            "What is wrong with a generation (one row per error found), or error_type 'none' for a generation "
            "checked and found correct. Filled by `atlas label-errors`: the toy world's pixel oracle (--oracle) "
            "or a user's labels (CSV/JSONL). A generation with no row here was never checked.",
            _cols(
                "run_id VARCHAR",
                "prompt_id INTEGER",
                "error_type VARCHAR | none (checked, correct), missing_object, extra_object, wrong_colour, colour_swap, "
                "colour_leakage, wrong_shape, shape_swap, position_swap, or a user's own label",
                "object_index SMALLINT | the object concerned, in the order the prompt names them (0 = first); NULL for the whole image",
                "object VARCHAR | the object concerned as the prompt names it, e.g. sphere",
                "attribute VARCHAR | what is wrong about it: colour, shape, texture, object (missing/extra), position; NULL if unknown",
                "expected VARCHAR | what the prompt asks for, e.g. red",
                "observed VARCHAR | what the image shows, e.g. blue",
                "source VARCHAR | oracle, or labels:<file name> for imported labels",
                "detail VARCHAR | free text or JSON (the oracle's colour fractions and box, a labeller's note)",
                "created_at TIMESTAMP",
            ),
        ),
        Table(
            "binding_pairs",
            "Attribute-object pairs of two-object prompts (\"a red cube and a blue sphere\"), with the text-stream "
            "token positions of the attribute word and of the object's head noun. Written by `atlas analyze`.",
            _cols(
                "run_id VARCHAR",
                "prompt_id INTEGER",
                "pair_index SMALLINT | 0 = first-named pair",
                "attribute VARCHAR | the attribute word, e.g. red",
                "attribute_kind VARCHAR | colour, shape, texture or attribute (unknown vocabulary)",
                "attribute_start SMALLINT | first text-stream position of the attribute word",
                "attribute_end SMALLINT | last text-stream position of the attribute word (inclusive)",
                "object VARCHAR | head noun of the object, e.g. sphere",
                "object_start SMALLINT | first text-stream position of the head noun",
                "object_end SMALLINT | last text-stream position of the head noun (inclusive)",
                "side VARCHAR | left or right where a world's grammar places the object, else NULL",
                "region_source VARCHAR | ground_truth (object_regions has its patches) or noun_features (found per graph)",
            ),
            primary_key=("run_id", "prompt_id", "pair_index"),
        ),
        Table(
            "object_regions",
            "Ground-truth image patches of each binding pair's object, where a world provides them (the toy "
            "world puts the objects of a pair in the left and right halves). Written by `atlas analyze`.",
            _cols(
                "run_id VARCHAR",
                "prompt_id INTEGER",
                "pair_index SMALLINT",
                "position SMALLINT | image-stream position (row-major patch index)",
                "source VARCHAR | e.g. toy_world:left",
            ),
            primary_key=("run_id", "prompt_id", "pair_index", "position"),
        ),
        Table(
            "supernodes",
            "Candidate supernodes: groups of features that play the same role across attribution graphs "
            "(connected components of feature pairs with similar graph neighbourhoods and co-occurrence; "
            "no decoder directions). Written by `atlas analyze`.",
            _cols(
                "run_id VARCHAR",
                "supernode_id INTEGER | 0 = the group with the most graphs",
                "layer INTEGER",
                "stream VARCHAR",
                "feature INTEGER",
                "n_members INTEGER | features in the group",
                "n_graphs INTEGER | graphs this feature appears in",
                "mean_similarity DOUBLE | mean role similarity of this feature to the other members it is linked to",
                "method VARCHAR | how the groups were formed, with the thresholds used",
                "created_at TIMESTAMP",
            ),
            primary_key=("run_id", "supernode_id", "layer", "stream", "feature"),
        ),
    ]
}

CATALOG_TABLES = [t for t in TABLES.values() if not t.fact]
FACT_TABLES = [t for t in TABLES.values() if t.fact]
