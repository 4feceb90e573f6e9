"""The toy world: procedural scenes of coloured shapes whose ground truth is known.

Fixed so others can check it (issue 4):

- Images are `IMAGE_SIZE` x `IMAGE_SIZE` (32x32) RGB uint8 on a black background with one or two
  objects. Colours (`COLOURS`, exact RGB) x shapes (`SHAPES`: circle, square, triangle apex up).
- A single object has a size of 10..16 px and its centre within +-4 px of the image centre.
- Two objects sit one in the left half (x < 16) and one in the right half (x >= 16), each 8..12 px,
  fully inside its half, with horizontal and vertical jitter.
- Captions (`caption`): "a {colour} {shape}", "a {c1} {s1} and a {c2} {s2}" (first-named object on
  the left), "a {c1} {s1} on the left of a {c2} {s2}" (first-named on the left) and
  "a {c1} {s1} on the right of a {c2} {s2}" (first-named on the right). `parse_prompt` reads
  them back (also accepting "an", upper case and a final period) and returns None for anything else.
- Geometry (pixel units; x to the right, y down; a pixel (x, y) has its centre at (x+.5, y+.5)):
  an object with top-left corner (x0, y0) and size s occupies exactly the box
  [x0, x0+s) x [y0, y0+s). Circle: pixel centres within s/2 of the box centre. Square: the whole
  box. Triangle (apex up): row y holds the pixels whose centre is within (y + 1 - y0) / 2 of the
  box's vertical mid-line, so the top row has 1-2 pixels and the bottom row spans the box.
  Pixels are either the object's exact colour or black (no anti-aliasing).
- The split (`split_combos`, `split_pairs`): 4 colour-shape combinations (`HELD_OUT_COMBOS`) never
  appear in training, alone or in pairs; of the remaining unordered pairs of seen combinations
  with different colours, 10% (`held_out_pairs`, fixed by a seeded permutation) never appear in
  training, in either order or any template. Like T2I-CompBench's seen/unseen split, this lets the
  oracle score seen vs unseen combinations separately. Pairs always have two different colours
  (so a leaked colour is visible); users may still prompt same-colour pairs.

Everything here is numpy-only and deterministic for a given `numpy.random.Generator`.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "IMAGE_SIZE", "COLOURS", "SHAPES", "TEMPLATES", "HELD_OUT_COMBOS", "HELD_OUT_PAIR_FRACTION",
    "ToyObject", "Scene", "ParsedObject", "shape_mask", "render", "caption", "parse_prompt",
    "all_combos", "split_combos", "split_pairs", "sample_single", "sample_pair", "sample_scene",
    "prompts_for", "PROMPT_FILES", "prompt_file_lines", "write_prompt_files",
]

#: Width and height of every toy image, pixels.
IMAGE_SIZE = 32

#: Colour name -> exact RGB (uint8 triple), in a fixed order.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 70, 235),
    "yellow": (240, 220, 20),
    "purple": (150, 40, 200),
    "orange": (250, 130, 10),
}

#: Shape names, in a fixed order.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

#: Caption templates; "one" for a single object, the others for a (left, right) pair. In
#: "right_of" the first-named object is the one on the right.
TEMPLATES: dict[str, str] = {
    "one": "a {c1} {s1}",
    "and": "a {c1} {s1} and a {c2} {s2}",
    "left_of": "a {c1} {s1} on the left of a {c2} {s2}",
    "right_of": "a {c1} {s1} on the right of a {c2} {s2}",
}
PAIR_TEMPLATES: tuple[str, ...] = ("and", "left_of", "right_of")

#: Colour-shape combinations never shown in training (each colour and shape still appears with
#: other partners).
HELD_OUT_COMBOS: tuple[tuple[str, str], ...] = (
    ("orange", "circle"), ("green", "triangle"), ("blue", "square"), ("purple", "circle"))

#: Fraction of unordered pairs of seen combinations held out entirely.
HELD_OUT_PAIR_FRACTION = 0.10
_PAIR_SPLIT_SEED = 20240604

# Size and jitter ranges (pixels).
SINGLE_SIZES = (10, 16)      # inclusive
SINGLE_JITTER = 4            # centre within +-4 px of (16, 16)
PAIR_SIZES = (8, 12)         # inclusive
PAIR_Y_JITTER = 6            # centre y within +-6 px of 16
HALF = IMAGE_SIZE // 2

Combo = tuple[str, str]      # (colour, shape)


@dataclass(frozen=True)
class ToyObject:
    """One object of a scene: colour and shape names, top-left corner (x0, y0) and size s (px).

    `bbox` is (x_min, y_min, x_max, y_max) with exclusive max, i.e. the object's pixels lie in
    rows y_min..y_max-1 and columns x_min..x_max-1, and every row/column of the box is touched.
    """

    colour: str
    shape: str
    x0: int
    y0: int
    size: int

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.x0 + self.size, self.y0 + self.size)

    @property
    def combo(self) -> Combo:
        return (self.colour, self.shape)

    @property
    def side(self) -> str:
        """"left" if the box centre is left of the image mid-line, else "right"."""
        return "left" if self.x0 + self.size / 2 < HALF else "right"

    def mask(self, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> np.ndarray:
        """Boolean [height, width] pixel mask of this object (see `shape_mask`)."""
        return shape_mask(self.shape, self.x0, self.y0, self.size, self.size, height, width)


@dataclass(frozen=True)
class Scene:
    """A scene: its objects (left one first for pairs) and the caption it was drawn for.

    `template` is a key of `TEMPLATES`. `image()` renders it (uint8 [32, 32, 3]); `masks()` gives
    one boolean [32, 32] mask per object, in `objects` order.
    """

    objects: tuple[ToyObject, ...]
    template: str = "one"
    caption: str = field(default="")

    def image(self) -> np.ndarray:
        return render(self.objects)

    def masks(self) -> list[np.ndarray]:
        return [o.mask() for o in self.objects]


@dataclass(frozen=True)
class ParsedObject:
    """An object named by a prompt: colour, shape and where the grammar puts it ("left",
    "right", or "any" for single-object prompts)."""

    colour: str
    shape: str
    side: str


def shape_mask(shape: str, x0: float, y0: float, w: float, h: float,
               height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> np.ndarray:
    """Rasterise a shape filling the box [x0, x0+w) x [y0, y0+h) into a bool [height, width] mask.

    circle: an ellipse inscribed in the box (a circle when w == h); square: the whole box;
    triangle: apex up, base along the box's bottom edge (row rule in the module docstring). The
    renderer uses w == h == size with integer corners; the oracle also fits non-square boxes.
    Raises ValueError for an unknown shape.
    """
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    cx, cy = xs + 0.5, ys + 0.5
    inside_box = (xs >= x0) & (xs < x0 + w) & (ys >= y0) & (ys < y0 + h)
    mx, my = x0 + w / 2.0, y0 + h / 2.0
    if shape == "circle":
        return inside_box & (((cx - mx) / (w / 2.0)) ** 2 + ((cy - my) / (h / 2.0)) ** 2 <= 1.0 + 1e-9)
    if shape == "square":
        return inside_box
    if shape == "triangle":
        half_width = (ys + 1.0 - y0) / h * (w / 2.0)
        return inside_box & (np.abs(cx - mx) <= half_width + 1e-9)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(objects: tuple[ToyObject, ...] | list[ToyObject], size: int = IMAGE_SIZE) -> np.ndarray:
    """Render objects on black: uint8 [size, size, 3]; later objects paint over earlier ones.

    Raises KeyError for an unknown colour, ValueError for an unknown shape.
    """
    img = np.zeros((size, size, 3), dtype=np.uint8)
    for obj in objects:
        img[obj.mask(size, size)] = COLOURS[obj.colour]
    return img


def caption(objects: tuple[ToyObject, ...] | list[ToyObject] | list[Combo], template: str = "and") -> str:
    """The caption of one object, or of a (left, right) pair under `template` ("and", "left_of",
    "right_of"; single objects always use "one"). Objects may be `ToyObject`s or (colour, shape).

    Raises ValueError for another number of objects or an unknown template.
    """
    combos = [o.combo if isinstance(o, ToyObject) else tuple(o) for o in objects]
    if len(combos) == 1:
        (c1, s1), = combos
        return TEMPLATES["one"].format(c1=c1, s1=s1)
    if len(combos) != 2:
        raise ValueError(f"a toy caption names 1 or 2 objects, got {len(combos)}")
    if template not in PAIR_TEMPLATES:
        raise ValueError(f"unknown pair template {template!r}; expected one of {PAIR_TEMPLATES}")
    left, right = combos
    first, second = (right, left) if template == "right_of" else (left, right)
    return TEMPLATES[template].format(c1=first[0], s1=first[1], c2=second[0], s2=second[1])


_COL = "|".join(COLOURS)
_SHP = "|".join(SHAPES)
_OBJ = rf"an? ({_COL}) ({_SHP})"
_PATTERNS = [
    (re.compile(rf"^{_OBJ}$"), "one"),
    (re.compile(rf"^{_OBJ} and {_OBJ}$"), "and"),
    (re.compile(rf"^{_OBJ} on the left of {_OBJ}$"), "left_of"),
    (re.compile(rf"^{_OBJ} on the right of {_OBJ}$"), "right_of"),
]


def parse_prompt(prompt: str) -> list[ParsedObject] | None:
    """Read a prompt of the toy grammar back into its objects, left object first for pairs.

    Case, surrounding/multiple whitespace, a final "." and "an" for "a" are tolerated. Returns
    None for a prompt outside the grammar (the model still runs on it; the oracle cannot judge it).
    """
    text = " ".join(prompt.lower().strip().rstrip(".").split())
    for pattern, template in _PATTERNS:
        m = pattern.match(text)
        if not m:
            continue
        g = m.groups()
        if template == "one":
            return [ParsedObject(g[0], g[1], "any")]
        first, second = (g[0], g[1]), (g[2], g[3])
        left, right = (second, first) if template == "right_of" else (first, second)
        return [ParsedObject(*left, "left"), ParsedObject(*right, "right")]
    return None


def all_combos() -> list[Combo]:
    """All 18 (colour, shape) combinations, colours outer, in `COLOURS` x `SHAPES` order."""
    return [(c, s) for c in COLOURS for s in SHAPES]


def split_combos() -> tuple[list[Combo], list[Combo]]:
    """(seen, held_out) colour-shape combinations: 14 and the 4 of `HELD_OUT_COMBOS`."""
    held = [c for c in all_combos() if c in HELD_OUT_COMBOS]
    return [c for c in all_combos() if c not in HELD_OUT_COMBOS], held


def split_pairs() -> dict[str, list[tuple[Combo, Combo]]]:
    """Ordered (left, right) layouts with two different colours, split three ways.

    Returns {"train": layouts of seen combos used in training, "held_out_pairs": layouts of seen
    combos whose unordered pair is held out (`HELD_OUT_PAIR_FRACTION`, both orders),
    "held_out_combos": layouts with at least one held-out combination}. Deterministic: the pair
    split is a permutation drawn with a fixed seed, independent of any training seed.
    With the shipped constants: 146, 16 and 108 layouts.
    """
    seen, _ = split_combos()
    unordered = [(a, b) for a, b in itertools.combinations(seen, 2) if a[0] != b[0]]
    rng = np.random.default_rng(_PAIR_SPLIT_SEED)
    n_held = int(round(HELD_OUT_PAIR_FRACTION * len(unordered)))
    held = {frozenset(unordered[i]) for i in rng.permutation(len(unordered))[:n_held]}
    out: dict[str, list[tuple[Combo, Combo]]] = {"train": [], "held_out_pairs": [], "held_out_combos": []}
    for left, right in itertools.product(all_combos(), repeat=2):
        if left[0] == right[0]:
            continue
        if left in HELD_OUT_COMBOS or right in HELD_OUT_COMBOS:
            out["held_out_combos"].append((left, right))
        elif frozenset((left, right)) in held:
            out["held_out_pairs"].append((left, right))
        else:
            out["train"].append((left, right))
    return out


def sample_single(rng: np.random.Generator, combo: Combo) -> Scene:
    """A single-object scene of `combo`: size 10..16 px, centre within +-4 px of the image centre."""
    s = int(rng.integers(SINGLE_SIZES[0], SINGLE_SIZES[1] + 1))
    cx = IMAGE_SIZE / 2 + rng.integers(-SINGLE_JITTER, SINGLE_JITTER + 1)
    cy = IMAGE_SIZE / 2 + rng.integers(-SINGLE_JITTER, SINGLE_JITTER + 1)
    obj = ToyObject(combo[0], combo[1], int(round(cx - s / 2)), int(round(cy - s / 2)), s)
    return Scene((obj,), "one", caption([obj]))


def _half_object(rng: np.random.Generator, combo: Combo, side: str) -> ToyObject:
    s = int(rng.integers(PAIR_SIZES[0], PAIR_SIZES[1] + 1))
    lo = 1 if side == "left" else HALF + 1           # 1 px margin to the border and the mid-line
    x0 = int(rng.integers(lo, lo + HALF - 2 - s + 1))
    cy = IMAGE_SIZE / 2 + rng.integers(-PAIR_Y_JITTER, PAIR_Y_JITTER + 1)
    y0 = int(np.clip(round(cy - s / 2), 1, IMAGE_SIZE - 1 - s))
    return ToyObject(combo[0], combo[1], x0, y0, s)


def sample_pair(rng: np.random.Generator, left: Combo, right: Combo, template: str = "and") -> Scene:
    """A two-object scene: `left` inside x in [1, 15), `right` inside x in [17, 31), sizes 8..12."""
    objs = (_half_object(rng, left, "left"), _half_object(rng, right, "right"))
    return Scene(objs, template, caption(objs, template))


def sample_scene(rng: np.random.Generator, split: str = "train", p_single: float = 0.3) -> Scene:
    """Draw a random scene of a split: "train" (seen combos, training pairs), "held_out_pairs" or
    "held_out_combos" (singles of held-out combos and their pairs). With probability `p_single`
    a single object, else a pair with a uniformly drawn template. Raises ValueError otherwise."""
    seen, held = split_combos()
    pairs = split_pairs()
    if split not in pairs:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(pairs)}")
    singles = {"train": seen, "held_out_pairs": seen, "held_out_combos": held}[split]
    if rng.random() < p_single:
        return sample_single(rng, singles[int(rng.integers(len(singles)))])
    left, right = pairs[split][int(rng.integers(len(pairs[split])))]
    return sample_pair(rng, left, right, PAIR_TEMPLATES[int(rng.integers(len(PAIR_TEMPLATES)))])


def prompts_for(split: str) -> list[str]:
    """Every caption of a split, sorted: "seen_single" (14), "held_out_single" (4),
    "train_pairs" (146 layouts x 3 templates), "held_out_pairs" (16 x 3), "held_out_combos"
    (108 x 3). Raises ValueError for another name."""
    seen, held = split_combos()
    if split == "seen_single":
        return sorted(caption([c]) for c in seen)
    if split == "held_out_single":
        return sorted(caption([c]) for c in held)
    key = {"train_pairs": "train", "held_out_pairs": "held_out_pairs", "held_out_combos": "held_out_combos"}.get(split)
    if key is None:
        raise ValueError(f"unknown prompt split {split!r}")
    return sorted(caption(list(p), t) for p in split_pairs()[key] for t in PAIR_TEMPLATES)


#: The shipped prompt files (data/toy/prompts/NAME.txt) and the splits each one concatenates:
#: "train" (what the transcoders are trained on: seen singles and training pairs) and "held_out"
#: (what the demo ingests: held-out singles, held-out pairs of seen combinations, and pairs with a
#: held-out combination).
PROMPT_FILES: dict[str, tuple[str, ...]] = {
    "train": ("seen_single", "train_pairs"),
    "held_out": ("held_out_single", "held_out_pairs", "held_out_combos"),
}


def prompt_file_lines(name: str) -> list[str]:
    """The lines of prompt file `name` (a key of `PROMPT_FILES`), in split order. Raises KeyError."""
    return [p for split in PROMPT_FILES[name] for p in prompts_for(split)]


def write_prompt_files(folder) -> list:
    """Write every `PROMPT_FILES` entry to `folder`/NAME.txt (one prompt per line, LF, UTF-8);
    returns the paths. Deterministic: rewriting gives identical bytes."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PROMPT_FILES:
        path = folder / f"{name}.txt"
        path.write_text("\n".join(prompt_file_lines(name)) + "\n", encoding="utf-8")
        paths.append(path)
    return paths
