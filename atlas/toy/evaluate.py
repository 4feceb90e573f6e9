"""Score a pipeline on the toy world with the pixel oracle: seen vs held-out prompts.

`evaluate(pipe)` generates every prompt of each evaluation set (`EVAL_SETS`, from
`atlas.toy.world.prompts_for`) with the stock `FluxPipeline.__call__` at the toy settings
(32x32, 4 steps, guidance 0, max_sequence_length 16) and `seeds` fixed seeds per prompt, judges
each image with `atlas.toy.oracle.judge` and aggregates with `atlas.toy.oracle.score`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from atlas.model.loading import TOY_RECOMMENDED
from atlas.toy.oracle import judge, score, to_uint8
from atlas.toy.world import prompts_for

__all__ = ["EVAL_SETS", "TOY_SETTINGS", "generate", "evaluate", "format_scores"]

#: Evaluation sets: name -> description.
EVAL_SETS = {
    "seen_single": "one object, seen combinations",
    "held_out_single": "one object, held-out combinations",
    "train_pairs": "two objects, training prompts",
    "held_out_pairs": "two objects, held-out pairs of seen combinations",
    "held_out_combos": "two objects, with a held-out combination",
}

#: The settings the toy model is run with (`atlas.model.loading.TOY_RECOMMENDED`).
TOY_SETTINGS = TOY_RECOMMENDED


def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], batch: int = 128,
             **overrides: Any) -> list[np.ndarray]:
    """Generate one image per (prompt, seed) pair with `pipe(...)` at `TOY_SETTINGS` (overridable),
    each with its own `torch.Generator().manual_seed(seed)` (so an image does not depend on its
    batch). Returns uint8 [H, W, 3] arrays in input order. Raises ValueError on length mismatch."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    settings = {**TOY_SETTINGS, **overrides}
    out: list[np.ndarray] = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch]]
        imgs = pipe(prompt=list(prompts[i:i + batch]), generator=gens, output_type="np", **settings).images
        out.extend(to_uint8(im) for im in imgs)
    return out


def evaluate(pipe, seeds: int = 2, sets: Sequence[str] = tuple(EVAL_SETS), keep_images: bool = False) -> dict:
    """Score `pipe` on each evaluation set with `seeds` seeds per prompt (image j of prompt i uses
    seed 100000 * j + i). Returns {set: score dict of `atlas.toy.oracle.score` plus "failures"
    (up to 12 failing prompts with their errors) and, with keep_images, "images"/"prompts"/
    "verdicts"}."""
    results: dict[str, Any] = {}
    for name in sets:
        base = prompts_for(name)
        prompts = [p for _ in range(seeds) for p in base]
        seed_list = [100000 * j + i for j in range(seeds) for i in range(len(base))]
        images = generate(pipe, prompts, seed_list)
        verdicts = [judge(im, p) for im, p in zip(images, prompts)]
        res = score(verdicts)
        res["failures"] = [{"prompt": v.prompt, "seed": s, "errors": v.errors}
                           for v, s in zip(verdicts, seed_list) if not v.correct][:12]
        if keep_images:
            res.update(images=images, prompts=prompts, verdicts=verdicts)
        results[name] = res
    return results


def format_scores(results: dict) -> str:
    """A plain-text table of `evaluate`'s results (percentages) and the error types seen."""
    lines = [f"{'set':<17} {'n':>5} {'colour':>7} {'shape':>7} {'binding':>8} {'all':>7}  errors"]
    for name, r in results.items():
        bind = "" if r["binding"] is None else f"{100 * r['binding']:.1f}%"
        errs = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "-"
        lines.append(f"{name:<17} {r['n']:>5} {100 * r['colour']:>6.1f}% {100 * r['shape']:>6.1f}% {bind:>8} "
                     f"{100 * r['correct']:>6.1f}%  {errs}")
    return "\n".join(lines)
