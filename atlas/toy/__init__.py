"""The toy world: procedural coloured-shape scenes with known ground truth, the pixel oracle
that judges generated images, and the one-command training of the toy FLUX pipeline.

- `atlas.toy.world`: renderer, caption grammar, seen/held-out split (numpy only).
- `atlas.toy.oracle`: `judge(image, prompt)` -> per-object colour/shape/binding verdicts.
- `atlas.toy.train`: `python -m atlas.toy.train --out data/toy/pipeline --seed 0`.
"""

from atlas.toy.oracle import ERROR_TYPES, ObjectVerdict, Verdict, judge, score
from atlas.toy.world import (
    COLOURS,
    HELD_OUT_COMBOS,
    IMAGE_SIZE,
    SHAPES,
    Scene,
    ToyObject,
    caption,
    parse_prompt,
    prompts_for,
    render,
    sample_pair,
    sample_scene,
    sample_single,
    split_combos,
    split_pairs,
)

__all__ = [
    "COLOURS", "SHAPES", "IMAGE_SIZE", "HELD_OUT_COMBOS", "ERROR_TYPES", "Scene", "ToyObject",
    "ObjectVerdict", "Verdict", "caption", "parse_prompt", "prompts_for", "render", "sample_pair",
    "sample_scene", "sample_single", "split_combos", "split_pairs", "judge", "score",
]
