"""Tests of atlas.toy: the world's renderer and split, the pixel oracle, and the shipped toy model."""

from __future__ import annotations

import numpy as np
import pytest

from atlas.toy import COLOURS, HELD_OUT_COMBOS, SHAPES, ToyObject, judge, parse_prompt, render, score
from atlas.toy.oracle import ERROR_TYPES, classify_pixels, components
from atlas.toy.world import (
    PAIR_TEMPLATES,
    caption,
    prompts_for,
    sample_pair,
    sample_scene,
    sample_single,
    shape_mask,
    split_combos,
    split_pairs,
)

SPLITS = ("train", "held_out_pairs", "held_out_combos")


def scenes(seed: int = 0, n: int = 200):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split) for split in SPLITS for _ in range(n)]


# -- the world -----------------------------------------------------------------------------------

def test_renderer_is_deterministic_and_exact():
    a, b = scenes(0, 50), scenes(0, 50)
    assert a == b
    assert all(np.array_equal(x.image(), y.image()) for x, y in zip(a, b))
    assert scenes(1, 50) != a
    for sc in a:
        img = sc.image()
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        union = np.zeros((32, 32), bool)
        for obj, mask in zip(sc.objects, sc.masks()):
            assert (img[mask] == COLOURS[obj.colour]).all()           # exact colour on the mask
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == obj.bbox
            assert not (union & mask).any()                            # objects never overlap
            union |= mask
        assert (img[~union] == 0).all()                                # black elsewhere
        if len(sc.objects) == 2:
            left, right = sc.objects
            assert left.bbox[2] <= 16 and right.bbox[0] >= 16 and left.side == "left" and right.side == "right"
            assert left.colour != right.colour


def test_shapes_and_sizes():
    sq = shape_mask("square", 3, 4, 10, 10)
    assert sq.sum() == 100
    circle = shape_mask("circle", 3, 4, 10, 10)
    tri = shape_mask("triangle", 3, 4, 10, 10)
    assert 70 <= circle.sum() <= 90 and 45 <= tri.sum() <= 65
    rows = tri.sum(1)[4:14]
    assert rows[0] <= 2 and rows[-1] == 10 and (np.diff(rows) >= 0).all()   # apex up
    with pytest.raises(ValueError):
        shape_mask("star", 0, 0, 5, 5)
    rng = np.random.default_rng(0)
    for _ in range(50):
        single = sample_single(rng, ("red", "circle")).objects[0]
        assert 10 <= single.size <= 16
        pair = sample_pair(rng, ("red", "circle"), ("blue", "triangle")).objects
        assert all(8 <= o.size <= 12 for o in pair)


def test_captions_and_parser():
    l, r = ToyObject("red", "circle", 2, 10, 9), ToyObject("blue", "square", 20, 8, 10)
    assert caption([l]) == "a red circle"
    assert caption([l, r], "and") == "a red circle and a blue square"
    assert caption([l, r], "left_of") == "a red circle on the left of a blue square"
    assert caption([l, r], "right_of") == "a blue square on the right of a red circle"
    for template in PAIR_TEMPLATES:
        parsed = parse_prompt(caption([l, r], template))
        assert [(p.colour, p.shape, p.side) for p in parsed] == [("red", "circle", "left"), ("blue", "square", "right")]
    assert [(p.colour, p.side) for p in parse_prompt("An Orange triangle.")] == [("orange", "any")]
    for outside in ("a red car", "a pink circle", "two dogs", "", "a red circle and", "red circle"):
        assert parse_prompt(outside) is None
    with pytest.raises(ValueError):
        judge(np.zeros((32, 32, 3), np.uint8), "a photo of a cat")


def test_split():
    seen, held = split_combos()
    assert len(seen) == 14 and sorted(held) == sorted(HELD_OUT_COMBOS)
    pairs = split_pairs()
    assert {k: len(v) for k, v in pairs.items()} == {"train": 146, "held_out_pairs": 16, "held_out_combos": 108}
    assert split_pairs() == pairs                                       # fixed, not seeded by training
    train = set(pairs["train"])
    assert not any(c in HELD_OUT_COMBOS for p in train for c in p)
    for left, right in pairs["held_out_pairs"]:                          # held out in both orders
        assert (left, right) not in train and (right, left) not in train
        assert (right, left) in pairs["held_out_pairs"]
    assert all(any(c in HELD_OUT_COMBOS for c in p) for p in pairs["held_out_combos"])
    rng = np.random.default_rng(0)
    for _ in range(500):                                                # training scenes never show held-out
        sc = sample_scene(rng, "train")
        assert not any(o.combo in HELD_OUT_COMBOS for o in sc.objects)
        if len(sc.objects) == 2:
            assert tuple(o.combo for o in sc.objects) in train
    assert len(prompts_for("seen_single")) == 14 and len(prompts_for("held_out_combos")) == 324


def test_shipped_prompt_files_are_the_split(tmp_path):
    from pathlib import Path

    from atlas.toy.world import PROMPT_FILES, prompt_file_lines, write_prompt_files

    shipped = Path(__file__).resolve().parents[1] / "data" / "toy" / "prompts"
    written = write_prompt_files(tmp_path)
    assert [p.name for p in written] == [f"{name}.txt" for name in PROMPT_FILES]
    for path in written:                                               # byte-identical to a fresh write
        assert (shipped / path.name).read_bytes() == path.read_bytes()
    train, held = set(prompt_file_lines("train")), set(prompt_file_lines("held_out"))
    assert not train & held and len(held) == 376 and len(train) == 452
    held_combos = split_combos()[1]
    train_layouts = {frozenset(p) for p in split_pairs()["train"]}
    for line in held:               # every held-out prompt has a held-out combination, or is a held-out pair
        combos = [(o.colour, o.shape) for o in parse_prompt(line)]
        if not any(c in held_combos for c in combos):
            assert len(combos) == 2 and frozenset(combos) not in train_layouts, line


# -- the oracle ----------------------------------------------------------------------------------

def test_oracle_is_right_on_ground_truth():
    verdicts = [judge(sc.image(), sc.caption) for sc in scenes(0, 200)]
    bad = [v.as_dict() for v in verdicts if not v.correct]
    assert not bad, bad[:3]
    s = score(verdicts)
    assert s["colour"] == s["shape"] == s["correct"] == s["binding"] == 1.0 and s["errors"] == {}
    for sc, v in zip(scenes(0, 200), verdicts):                        # boxes recovered exactly
        assert [o.bbox for o in v.objects] == [o.bbox for o in sc.objects]
    # Float images in [0, 1] (the pipeline's output_type="np") and PIL images work the same.
    from PIL import Image
    sc = scenes(3, 1)[1]
    assert judge(sc.image() / 255.0, sc.caption).correct
    assert judge(Image.fromarray(sc.image()), sc.caption).correct


def test_pixel_classifier_and_components():
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names])
    assert list(classify_pixels(palette)) == list(range(len(names)))
    assert list(classify_pixels(palette * 0.5)) == list(range(len(names)))   # darker edges keep hue
    m = np.zeros((8, 8), bool)
    m[0:2, 0:2] = True
    m[2, 2] = True            # diagonal neighbour -> same component
    m[6:8, 5:8] = True
    comps = components(m)
    assert [int(c.sum()) for c in comps] == [6, 5]


PAIR = (ToyObject("red", "circle", 3, 10, 10), ToyObject("blue", "square", 19, 9, 10))
PAIR_PROMPT = "a red circle and a blue square"


def _errors(objects, prompt=PAIR_PROMPT):
    v = judge(render(objects), prompt)
    return v, v.errors


def _recolour(obj, colour):
    return ToyObject(colour, obj.shape, obj.x0, obj.y0, obj.size)


def _reshape(obj, shape):
    return ToyObject(obj.colour, shape, obj.x0, obj.y0, obj.size)


def test_oracle_error_types():
    left, right = PAIR
    v, errs = _errors(PAIR)
    assert v.correct and v.binding_correct and errs == []
    # swapped colours
    v, errs = _errors((_recolour(left, "blue"), _recolour(right, "red")))
    assert errs == ["colour_swap"] and not v.binding_correct and not v.colour_correct and v.shape_correct
    # leaked colour: the square turns red (whole object) ...
    v, errs = _errors((left, _recolour(right, "red")))
    assert errs == ["colour_leakage"] and not v.binding_correct
    assert v.objects[0].colour_correct and not v.objects[1].colour_correct
    # ... or partly red (40% of its pixels)
    img = render(PAIR)
    mask = right.mask()
    rows = np.nonzero(mask.any(1))[0]
    part = mask & (np.arange(32)[:, None] < rows[0] + 4)
    img[part] = COLOURS["red"]
    v = judge(img, PAIR_PROMPT)
    assert v.errors == ["colour_leakage"] and v.objects[1].colour == "blue" and not v.binding_correct
    # missing object (pair and single)
    v, errs = _errors((left,))
    assert errs == ["missing_object"] and not v.objects[1].found and v.binding_correct is False
    v, errs = _errors((), "a red circle")
    assert errs == ["missing_object"] and not v.correct
    # wrong shape (pair and single)
    v, errs = _errors((left, _reshape(right, "triangle")))
    assert errs == ["wrong_shape"] and v.colour_correct and not v.shape_correct and v.binding_correct
    v, errs = _errors((_reshape(left, "square"),), "a red triangle")
    assert errs == ["wrong_shape"]
    # wrong colour (not named by the prompt)
    v, errs = _errors((left, _recolour(right, "green")))
    assert errs == ["wrong_colour"] and v.binding_correct
    # shapes exchanged between the objects / the objects drawn on each other's side
    v, errs = _errors((_reshape(left, "square"), _reshape(right, "circle")))
    assert errs == ["shape_swap"] and not v.binding_correct
    moved = (ToyObject("blue", "square", 3, 10, 10), ToyObject("red", "circle", 19, 9, 10))
    v, errs = _errors(moved)
    assert errs == ["position_swap"] and not v.correct
    # an extra object
    v, errs = _errors(PAIR, "a blue square")              # the largest object is judged
    assert errs == ["extra_object"] and not v.correct and v.colour_correct and v.shape_correct
    # "on the right of" puts the first-named object on the right
    assert judge(render(PAIR), "a blue square on the right of a red circle").correct
    assert judge(render(PAIR), "a red circle on the right of a blue square").errors == ["position_swap"]
    assert set(ERROR_TYPES) >= {"colour_swap", "colour_leakage", "missing_object", "wrong_shape"}


# -- the shipped toy model -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_pipe():
    from atlas.model.loading import TOY_PIPELINE_DIR, load_pipeline
    if not (TOY_PIPELINE_DIR / "model_index.json").is_file():
        pytest.skip(f"no shipped toy pipeline at {TOY_PIPELINE_DIR}; train it with "
                    "`python -m atlas.toy.train --out data/toy/pipeline --seed 0`")
    import torch
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_pipeline("toy")


def test_toy_is_registered_and_small(toy_pipe):
    from atlas.model.loading import TOY_PIPELINE_DIR, describe_pipeline, recommended_settings
    settings = recommended_settings("toy")
    assert settings == {"height": 32, "width": 32, "num_inference_steps": 4, "guidance_scale": 0.0,
                        "max_sequence_length": 16}
    size = sum(f.stat().st_size for f in TOY_PIPELINE_DIR.rglob("*") if f.is_file())
    assert size <= 22e6, size
    facts = describe_pipeline(toy_pipe, "toy")
    assert facts["source"] == "builtin" and facts["vae_scale_factor"] == 2 and facts["n_double_blocks"] >= 1
    assert not toy_pipe.transformer.training and not toy_pipe.text_encoder_2.training


def test_toy_generation_is_deterministic(toy_pipe):
    from atlas.toy.evaluate import generate
    prompts = ["a red circle", "a green square and a purple triangle", "a photo of a cat on a sofa ✨"]
    seeds = [0, 1, 2]
    a = generate(toy_pipe, prompts, seeds)
    b = generate(toy_pipe, prompts[::-1], seeds[::-1])[::-1]        # batch order does not matter
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b))
    assert all(x.shape == (32, 32, 3) for x in a)                    # prompts outside the grammar run
    assert generate(toy_pipe, prompts[:1], [5])[0].tobytes() != a[0].tobytes()


SMOKE = [  # seen and held-out combinations, all three pair templates
    "a red circle", "a blue triangle", "a yellow square", "an orange triangle",
    "a blue square", "a purple circle",
    "a red square and a blue triangle", "a yellow circle on the left of a green square",
    "a purple square on the right of an orange triangle", "a green circle and a red triangle",
    "a blue circle and a yellow triangle", "a red circle on the left of a purple triangle",
]


def test_toy_quality_smoke(toy_pipe):
    from atlas.toy.evaluate import generate
    seeds = list(range(len(SMOKE)))
    verdicts = [judge(im, p) for im, p in zip(generate(toy_pipe, SMOKE, seeds), SMOKE)]
    single = [v for v in verdicts if v.n_objects == 1]
    pairs = [v for v in verdicts if v.n_objects == 2]
    assert sum(v.colour_correct and v.shape_correct for v in single) >= 5, [v.as_dict() for v in single]
    assert sum(v.correct for v in pairs) >= 4, [v.as_dict() for v in pairs]


# -- the shipped transcoders ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_transcoders(toy_pipe):
    from atlas.transcoders import BUILTIN_TRANSCODERS, load_transcoders
    if not (BUILTIN_TRANSCODERS["toy"] / "temporal-aware-transcoders").is_dir():
        pytest.skip("no shipped toy transcoders; train them with `make toy`")
    return load_transcoders("toy", d_model=toy_pipe.transformer.inner_dim)


def test_toy_transcoders_are_shipped_in_the_published_layout(toy_pipe, toy_transcoders):
    import json

    from atlas.transcoders import BUILTIN_TRANSCODERS, file_sha256, load_transcoders
    root = BUILTIN_TRANSCODERS["toy"]
    n_double = len(toy_pipe.transformer.transformer_blocks)
    assert sorted(toy_transcoders) == sorted(f"{s}_{layer}" for s in ("img", "txt") for layer in range(n_double))
    saes = load_transcoders("toy", d_model=toy_pipe.transformer.inner_dim, role="sae", streams="img")
    assert sorted(saes) == ["img_1", "img_2"] and all(m.role == "sae" for m in saes.values())
    for folder in ("temporal-aware-transcoders", "temporal-aware-saes"):
        manifest = json.loads((root / folder / "manifest.json").read_text())
        assert manifest["files"]
        for name, sha in manifest["files"].items():
            assert file_sha256(root / folder / name) == sha, name
        record = json.loads((root / folder / "training.json").read_text())
        assert record["evaluation"], folder                           # fidelity measured on held-out prompts
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and ".train-state" not in f.parts)
    assert size <= 30e6, size                                         # pipeline + transcoders + SAEs


def _token_colours(image: np.ndarray, grid: int = 8) -> list:
    """Per token of the packed latent grid (row-major, 4x4 pixels each at 32x32): the palette colour
    of most of its foreground pixels, or None when fewer than 8 of its 16 pixels are foreground."""
    from atlas.toy.oracle import FG_THRESHOLD
    cell = image.shape[0] // grid
    patches = image.reshape(grid, cell, grid, cell, 3).transpose(0, 2, 1, 3, 4).reshape(grid * grid, -1, 3)
    names = list(COLOURS)
    out = []
    for px in patches:
        fg = px.max(-1) >= FG_THRESHOLD
        out.append(names[int(np.bincount(classify_pixels(px[fg]), minlength=6).argmax())] if fg.sum() >= 8 else None)
    return out


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counted half (Mann-Whitney U / (n_pos n_neg))."""
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def _codes(pipe, tc, layer: int, step: int, prompts: list, seeds: list):
    """Generate, capture the image-stream MLP input of `layer` at denoising `step` and encode it:
    (z [N, 64, d_feat] as numpy, token colour labels [N * 64])."""
    import torch

    from atlas.model import MLPCapture
    from atlas.toy.evaluate import generate
    with MLPCapture(pipe.transformer, layers=[layer], streams=["img"]) as cap:
        images = generate(pipe, prompts, seeds, batch=len(prompts))
    rec = cap.steps[step]
    with torch.no_grad():
        z = tc.encode(rec.mlp[(layer, "img")].x.float(), rec.sigma).numpy()
    return z.reshape(-1, z.shape[-1]), [c for im in images for c in _token_colours(im)]


def test_a_colour_feature_of_the_toy_fires_on_its_colour(toy_pipe, toy_transcoders):
    """The oracle test the toy world exists for: pick, on training prompts, the image-stream feature
    that best separates tokens of one colour from tokens of the other colours (highest AUROC); on
    held-out prompts (unseen combinations and pairs, other seeds) it must still fire on that colour's
    patches. (Colour is spread over a few features in these transcoders: the best single feature
    for red reaches AUROC 0.89 on the training prompts themselves, hence the 0.85 bar.)"""
    layer, step = 3, 3            # the last double-stream layer at the last denoising step (sigma 0.25)
    tc = toy_transcoders[f"img_{layer}"]
    train = prompts_for("seen_single") + prompts_for("train_pairs")[::12]
    held = prompts_for("held_out_single") + prompts_for("held_out_combos")[::6]
    z_a, lab_a = _codes(toy_pipe, tc, layer, step, train, list(range(len(train))))
    z_b, lab_b = _codes(toy_pipe, tc, layer, step, held, [1000 + i for i in range(len(held))])
    lab_a, lab_b = np.array(lab_a, dtype=object), np.array(lab_b, dtype=object)
    for colour in ("red", "green", "blue"):
        on_a, off_a = lab_a == colour, (lab_a != colour) & (lab_a != None)  # noqa: E711
        alive = np.nonzero(z_a.max(0) > 0)[0]
        f = int(alive[np.argmax([_auroc(z_a[on_a, j], z_a[off_a, j]) for j in alive])])
        on_b, off_b = lab_b == colour, (lab_b != colour) & (lab_b != None)  # noqa: E711
        assert on_b.sum() >= 10 and off_b.sum() >= 10
        auc = _auroc(z_b[on_b, f], z_b[off_b, f])
        assert auc >= 0.85, (colour, f, auc)
