"""Attribute-object pairs of two-object prompts, located on the text stream, and the ground-truth
object regions where a world provides them: the inputs of the ``attribute_binding`` and
``binding_features`` queries (tables ``binding_pairs`` and ``object_regions``).

Parsing (:func:`parse_pairs`) follows the T2I-CompBench attribute-binding templates: a prompt is
split into exactly two conjuncts at " and " (or a spatial connective such as " on the left of ");
in each conjunct, after a leading article, the first word is the attribute ("red", "wooden",
"spherical") and the last word the object's head noun ("a green traffic light" -> green, light).
Prompts that do not split into two such conjuncts have no pairs.

Locating (:func:`align_words`, :func:`word_spans`, :func:`locate_pairs`): the prompt's stored
tokens (``prompt_tokens``) are aligned to the characters of its text, so each word gets the
positions of the tokens that spell it (any sub-word scheme); where the tokens do not spell the
text (unknown tokens), they are grouped into words by their SentencePiece "▁" markers instead.
The attribute and head noun of each pair are matched in order; their first and last token
positions are stored.

Regions (:func:`toy_regions`): prompts of the toy world's grammar (:mod:`atlas.toy.world`,
imported only if present) place a pair's objects in the left and right image halves; their
patches are the ground truth. Other prompts get no stored region, and the queries find the
object's patches from the noun's strongest downstream image features instead. No torch here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import polars as pl

__all__ = ["COLOUR_WORDS", "SHAPE_WORDS", "TEXTURE_WORDS", "PairSpec", "parse_pairs", "attribute_kind",
           "align_words", "word_spans", "locate_pairs", "toy_sides", "toy_regions", "build_binding_rows", "write_binding_tables"]

COLOUR_WORDS = frozenset(
    "red green blue yellow purple orange black white brown pink gray grey gold golden silver beige tan cyan "
    "magenta violet maroon navy turquoise teal crimson indigo".split())
SHAPE_WORDS = frozenset(
    "round square oval triangular rectangular circular cubic spherical cylindrical conical pyramidal pentagonal "
    "hexagonal octagonal oblong teardrop diamond star heart flat curved long short tall".split())
TEXTURE_WORDS = frozenset(
    "wooden metallic metal plastic glass fabric leather rubber fluffy furry ceramic stone marble velvet wool "
    "woolen silk cotton paper rough smooth shiny".split())

_CONNECTIVES = re.compile(
    r"\s+(?:and|on the left of|on the right of|to the left of|to the right of|next to|on top of|"
    r"beside|near|above|below|under)\s+")
_ARTICLES = {"a", "an", "the", "one"}
_SPECIAL = {"</s>", "<pad>", "<s>", "<unk>", "<|endoftext|>", "<|startoftext|>"}


@dataclass(frozen=True)
class PairSpec:
    """One attribute-object pair of a prompt, in naming order: the attribute word, the object's
    words (after the article) and its head noun (the last of them)."""

    attribute: str
    object_words: tuple[str, ...]

    @property
    def object(self) -> str:
        return self.object_words[-1]


def _norm(word: str) -> str:
    return re.sub(r"[^0-9a-z\-]", "", word.lower())


def parse_pairs(text: str) -> list[PairSpec] | None:
    """Two attribute-object pairs of ``text`` in naming order, or None.

    "a red cube and a blue sphere" -> [PairSpec("red", ("cube",)), PairSpec("blue", ("sphere",))].
    Returns None unless the prompt splits into exactly two conjuncts of at least two words each.
    """
    clean = " ".join(text.lower().strip().rstrip(".").split())
    parts = _CONNECTIVES.split(clean)
    if len(parts) != 2:
        return None
    pairs = []
    for part in parts:
        words = [_norm(w) for w in part.split()]
        words = [w for w in words if w]
        while words and words[0] in _ARTICLES:
            words = words[1:]
        if len(words) < 2:
            return None
        pairs.append(PairSpec(words[0], tuple(words[1:])))
    return pairs


def attribute_kind(word: str) -> str:
    """colour, shape, texture, or attribute for a word outside the built-in vocabularies."""
    if word in COLOUR_WORDS:
        return "colour"
    if word in SHAPE_WORDS:
        return "shape"
    if word in TEXTURE_WORDS:
        return "texture"
    return "attribute"


def word_spans(tokens: list[tuple[int, str]]) -> list[tuple[str, int, int]]:
    """Group ``(position, token)`` (sorted by position) into words: ``(normalised word, first, last)``.

    Special tokens (</s>, <pad>, ...) are dropped. With SentencePiece tokens ("▁red") a token that
    starts with "▁" opens a new word and other pieces extend it; otherwise every token is a word.
    """
    toks = [(int(p), t) for p, t in sorted(tokens) if t is not None and t not in _SPECIAL]
    sentencepiece = any(t.startswith("▁") for _, t in toks)
    words: list[list] = []
    for pos, tok in toks:
        if not sentencepiece or tok.startswith("▁") or not words:
            words.append([tok.lstrip("▁"), pos, pos])
        else:
            words[-1][0] += tok
            words[-1][2] = pos
    return [(_norm(w), a, b) for w, a, b in words if _norm(w)]


def align_words(text: str, tokens: list[tuple[int, str]]) -> list[tuple[str, int, int]] | None:
    """Word spans of ``text`` on its tokens by aligning the token strings to the text's characters.

    Works for any sub-word scheme whose pieces spell the text (SentencePiece "▁" and WordPiece "##"
    markers stripped, case and whitespace ignored, punctuation the tokenizer dropped skipped): each
    whitespace-separated word of the text gets the first and last position of the tokens that
    overlap its characters. Returns
    ``[(normalised word, first, last)]``, or None when the tokens do not spell the text (unknown
    tokens, normalisation); :func:`word_spans` is the fallback then.
    """
    target = "".join(ch for ch in text.lower() if not ch.isspace())
    i, ranges = 0, []
    for pos, tok in sorted(tokens):
        if tok is None or tok in _SPECIAL:
            continue
        piece = "".join(ch for ch in tok.replace("▁", "").replace("##", "").lower() if not ch.isspace())
        if not piece:
            continue
        while i < len(target) and not target.startswith(piece, i) and not target[i].isalnum():
            i += 1  # punctuation the tokenizer dropped
        if not target.startswith(piece, i):
            return None
        ranges.append((int(pos), i, i + len(piece)))
        i += len(piece)
    if any(ch.isalnum() for ch in target[i:]):
        return None
    words, off = [], 0
    for w in text.lower().split():
        start, end = off, off + len(w)
        cover = [p for p, a, b in ranges if a < end and b > start]
        if cover and _norm(w):
            words.append((_norm(w), min(cover), max(cover)))
        off = end
    return words


def locate_pairs(pairs: list[PairSpec], spans: list[tuple[str, int, int]]) -> list[dict] | None:
    """Token positions of each pair's attribute and head noun, matched in order; None if any is missing.

    Returns one dict per pair: attribute_start/end, object_start/end (inclusive text positions).
    """
    out, i = [], 0
    for pair in pairs:
        found = {}
        for role, word in (("attribute", pair.attribute), ("object", pair.object)):
            while i < len(spans) and spans[i][0] != word:
                i += 1
            if i == len(spans):
                return None
            found[f"{role}_start"], found[f"{role}_end"] = spans[i][1], spans[i][2]
            i += 1
        out.append(found)
    return out


def toy_sides(text: str) -> list[str] | None:
    """Sides ("left"/"right") of the two pairs, in naming order, for a prompt of the toy world's
    grammar; None for other prompts or when :mod:`atlas.toy.world` is not installed."""
    try:
        from atlas.toy.world import parse_prompt
    except ImportError:  # the toy world is optional
        return None
    objs = parse_prompt(text)
    if not objs or len(objs) != 2:
        return None
    right_first = " on the right of " in " ".join(text.lower().split())
    return ["right", "left"] if right_first else ["left", "right"]


def toy_regions(side: str, height: int, width: int, patch_px: int) -> list[int]:
    """Image-stream positions (row-major patches) of one half of the image.

    A patch belongs to the left half when its centre's x < width / 2 (the toy world puts the left
    object at x < 16 of 32 px). Raises ValueError for another side.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be left or right, not {side!r}")
    gw, gh = width // patch_px, height // patch_px
    cols = [c for c in range(gw) if ((c + 0.5) * patch_px < width / 2) == (side == "left")]
    return [r * gw + c for r in range(gh) for c in cols]


def build_binding_rows(prompts: pl.DataFrame, tokens: pl.DataFrame, runs: pl.DataFrame,
                       regions: str = "auto") -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Rows of ``binding_pairs`` and ``object_regions`` for a set of generations.

    Args:
        prompts: columns run_id, prompt_id, text. tokens: run_id, prompt_id, position, token
            (``prompt_tokens``). runs: run_id, height, width, patch_px.
        regions: "auto" (toy-grammar prompts get ground-truth halves) or "none" (no stored regions;
            the queries use noun features everywhere).
    Returns:
        (pairs frame, regions frame, counts: prompts, with_pairs, not_two_pairs, not_located, ground_truth).
    """
    geometry = {r["run_id"]: r for r in runs.iter_rows(named=True)}
    tok_by = {}
    for (run, pid), grp in tokens.group_by(["run_id", "prompt_id"]):
        tok_by[(run, pid)] = list(zip(grp["position"].to_list(), grp["token"].to_list()))
    pair_rows, region_rows = [], []
    counts = {"prompts": len(prompts), "with_pairs": 0, "not_two_pairs": 0, "not_located": 0, "ground_truth": 0}
    for row in prompts.iter_rows(named=True):
        run, pid, text = row["run_id"], row["prompt_id"], row["text"]
        pairs = parse_pairs(text)
        if pairs is None:
            counts["not_two_pairs"] += 1
            continue
        toks = tok_by.get((run, pid), [])
        located = locate_pairs(pairs, align_words(text, toks) or word_spans(toks))
        if located is None:
            counts["not_located"] += 1
            continue
        sides = toy_sides(text) if regions == "auto" else None
        geo = geometry.get(run)
        if sides and (geo is None or not all(geo.get(k) for k in ("height", "width", "patch_px"))):
            sides = None
        counts["with_pairs"] += 1
        counts["ground_truth"] += bool(sides)
        for i, (pair, pos) in enumerate(zip(pairs, located)):
            side = sides[i] if sides else None
            pair_rows.append({"run_id": run, "prompt_id": pid, "pair_index": i, "attribute": pair.attribute,
                              "attribute_kind": attribute_kind(pair.attribute), **pos, "object": pair.object,
                              "side": side, "region_source": "ground_truth" if side else "noun_features"})
            if side:
                for p in toy_regions(side, geo["height"], geo["width"], geo["patch_px"]):
                    region_rows.append({"run_id": run, "prompt_id": pid, "pair_index": i, "position": p,
                                        "source": f"toy_world:{side}"})
    pair_schema = {"run_id": pl.Utf8, "prompt_id": pl.Int32, "pair_index": pl.Int16, "attribute": pl.Utf8,
                   "attribute_kind": pl.Utf8, "attribute_start": pl.Int16, "attribute_end": pl.Int16,
                   "object_start": pl.Int16, "object_end": pl.Int16, "object": pl.Utf8, "side": pl.Utf8,
                   "region_source": pl.Utf8}
    region_schema = {"run_id": pl.Utf8, "prompt_id": pl.Int32, "pair_index": pl.Int16, "position": pl.Int16,
                     "source": pl.Utf8}
    return (pl.DataFrame(pair_rows, schema=pair_schema), pl.DataFrame(region_rows, schema=region_schema), counts)


def _run_geometry(atlas, cond: str, params: list) -> pl.DataFrame:
    """run_id, height, width, patch_px of the selected runs; from model_json for runs written before
    the geometry columns existed (height/width of the resolved generation, patch = 2 x VAE scale)."""
    import json

    cols = set(atlas.sql("SELECT column_name FROM (DESCRIBE runs)")["column_name"].to_list())
    if {"height", "width", "patch_px"} <= cols:
        return atlas.sql(f"SELECT run_id, height, width, patch_px FROM runs WHERE {cond}", params)
    rows = []
    for run, model_json in atlas.sql(f"SELECT run_id, model_json FROM runs WHERE {cond}", params).iter_rows():
        m = json.loads(model_json or "{}")
        gen = m.get("resolved", {}).get("resolved_generation") or {}
        patch = 2 * int(m["vae_scale_factor"]) if m.get("vae_scale_factor") else None
        rows.append({"run_id": run, "height": gen.get("height"), "width": gen.get("width"), "patch_px": patch})
    return pl.DataFrame(rows, schema={"run_id": pl.Utf8, "height": pl.Int64, "width": pl.Int64, "patch_px": pl.Int64})


def write_binding_tables(atlas_dir: str | Path, run_id: str | None = None, regions: str = "auto") -> dict:
    """Parse every generation of ``run_id`` (all runs if None) and replace its ``binding_pairs`` and
    ``object_regions`` rows. Returns the counts of :func:`build_binding_rows` plus pairs/patches written.

    Raises AtlasError (not an atlas) and ValueError (unknown ``regions`` mode).
    """
    from atlas.query import Atlas
    from atlas.query.derived import prepare_atlas, replace_rows

    if regions not in ("auto", "none"):
        raise ValueError(f"regions must be auto or none, not {regions!r}")
    prepare_atlas(atlas_dir)
    atlas = Atlas(atlas_dir)
    cond, params = ("run_id = ?", [run_id]) if run_id else ("true", [])
    prompts = atlas.sql(f"SELECT run_id, prompt_id, text FROM prompts WHERE {cond} ORDER BY run_id, prompt_id", params)
    tokens = atlas.sql(f"SELECT run_id, prompt_id, position, token FROM prompt_tokens WHERE {cond}", params)
    runs = _run_geometry(atlas, cond, params)
    pairs, region_rows, counts = build_binding_rows(prompts, tokens, runs, regions)
    counts["pairs"] = replace_rows(atlas_dir, "binding_pairs", cond, params, pairs)
    counts["region_patches"] = replace_rows(atlas_dir, "object_regions", cond, params, region_rows)
    return counts
