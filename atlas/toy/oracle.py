"""The pixel oracle: judge a generated toy image against its prompt, from pixels alone.

For every object the prompt names (`atlas.toy.world.parse_prompt`), the oracle looks where the
grammar puts it (the whole image for one object; the left half x < 16 or right half x >= 16 for
a pair), finds the object and answers: found?, colour, shape, and an error type when wrong.

How (all thresholds are module constants):
- Foreground: pixels whose brightest channel is >= `FG_THRESHOLD` (96 of 255); the background is
  black and every palette colour has a channel >= 200, so this cuts at about half intensity.
- Objects: 8-connected components of the foreground inside the region; the largest is the
  object (missing if smaller than `MIN_AREA` px). Another component of >= `MIN_AREA` px in the
  same region is an extra object.
- Colour: every pixel of the object is assigned the palette colour it is closest to after the
  best brightness scaling (so darker anti-aliased edges keep their hue); the most frequent is the
  object's colour, and the per-colour fractions are kept.
- Shape: each shape of the renderer is rasterised into the object's bounding box (`shape_mask`,
  so an ellipse / stretched triangle for non-square boxes) and compared with the object's pixels
  by IoU; the best is the object's shape. On rendered images the right template matches exactly.

Error types (`ERROR_TYPES`): "missing_object"; "extra_object"; "wrong_colour" (a colour the
prompt does not name); "colour_swap" (each object of a pair shows the other's colour);
"colour_leakage" (an object shows the other object's colour, as its main colour or on at least
`LEAK_FRACTION` of its pixels, while the other keeps its own); "wrong_shape"; "shape_swap" (each
object has the other's shape); "position_swap" (both objects drawn, but on each other's side:
colours and shapes both exchanged). A pair is "binding correct" when both objects are found and
none of colour_swap, colour_leakage, shape_swap, position_swap applies: each colour sits on its
own object.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from atlas.toy.world import COLOURS, SHAPES, ParsedObject, parse_prompt, shape_mask

__all__ = [
    "FG_THRESHOLD", "MIN_AREA", "LEAK_FRACTION", "ERROR_TYPES", "BINDING_ERRORS",
    "ObjectVerdict", "Verdict", "to_uint8", "classify_pixels", "components", "judge", "score",
]

FG_THRESHOLD = 96
MIN_AREA = 12
LEAK_FRACTION = 0.25
ERROR_TYPES = ("missing_object", "extra_object", "wrong_colour", "colour_swap", "colour_leakage",
               "wrong_shape", "shape_swap", "position_swap")
BINDING_ERRORS = ("colour_swap", "colour_leakage", "shape_swap", "position_swap")

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], dtype=np.float64)      # [6, 3]


@dataclass
class ObjectVerdict:
    """What the oracle saw for one object the prompt names.

    expected_colour/expected_shape/side: from the prompt ("any" side for single objects).
    found: an object of >= MIN_AREA px was in the region. colour/shape: what was seen (None if not
    found). colour_fractions: palette colour -> fraction of the object's pixels. shape_iou: IoU of
    the chosen shape template. bbox: (x_min, y_min, x_max, y_max), exclusive max, image pixels.
    area: object pixels. errors: error types for this object (empty when correct).
    """

    expected_colour: str
    expected_shape: str
    side: str
    found: bool = False
    colour: str | None = None
    shape: str | None = None
    colour_fractions: dict[str, float] = field(default_factory=dict)
    shape_iou: float = 0.0
    bbox: tuple[int, int, int, int] | None = None
    area: int = 0
    n_extra: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def colour_correct(self) -> bool:
        """Found, main colour as named, and no leaked colour."""
        return self.found and self.colour == self.expected_colour and "colour_leakage" not in self.errors

    @property
    def shape_correct(self) -> bool:
        return self.found and self.shape == self.expected_shape


@dataclass
class Verdict:
    """The oracle's judgement of one image: the prompt, one `ObjectVerdict` per named object
    (left first for pairs) and summary flags. `binding_correct` is None for single objects."""

    prompt: str
    objects: list[ObjectVerdict]

    @property
    def n_objects(self) -> int:
        return len(self.objects)

    @property
    def errors(self) -> list[str]:
        """Distinct error types over all objects, in `ERROR_TYPES` order."""
        seen = {e for o in self.objects for e in o.errors}
        return [e for e in ERROR_TYPES if e in seen]

    @property
    def colour_correct(self) -> bool:
        return all(o.colour_correct for o in self.objects)

    @property
    def shape_correct(self) -> bool:
        return all(o.shape_correct for o in self.objects)

    @property
    def binding_correct(self) -> bool | None:
        if len(self.objects) < 2:
            return None
        return all(o.found for o in self.objects) and not any(e in BINDING_ERRORS for e in self.errors)

    @property
    def correct(self) -> bool:
        """Every object found with its colour and shape, on its side, and nothing extra."""
        return not self.errors and self.colour_correct and self.shape_correct

    def as_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "correct": self.correct, "colour_correct": self.colour_correct,
                "shape_correct": self.shape_correct, "binding_correct": self.binding_correct,
                "errors": self.errors,
                "objects": [{"expected": (o.expected_colour, o.expected_shape), "side": o.side, "found": o.found,
                             "colour": o.colour, "shape": o.shape, "shape_iou": round(o.shape_iou, 3),
                             "bbox": o.bbox, "area": o.area, "errors": list(o.errors),
                             "colour_fractions": {k: round(v, 3) for k, v in o.colour_fractions.items()}}
                            for o in self.objects]}


def to_uint8(image: Any) -> np.ndarray:
    """Convert a PIL image, a uint8 [H, W, 3] array or a float [H, W, 3] array in [0, 1] (the
    pipeline's output_type="np") to a uint8 [H, W, 3] array. Raises ValueError on other shapes."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    return np.clip(np.round(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


def classify_pixels(pixels: np.ndarray) -> np.ndarray:
    """Palette index (into `COLOURS` order) of each RGB pixel, [N, 3] (0..255) -> int [N].

    Each palette colour c is scaled by the brightness factor a = clip(p.c / c.c, 0.35, 1.25) that
    best fits the pixel p; the colour with the smallest |p - a c| wins. Exact palette colours map
    to themselves."""
    p = np.asarray(pixels, dtype=np.float64).reshape(-1, 1, 3)
    alpha = np.clip((p * _PALETTE).sum(-1) / (_PALETTE ** 2).sum(-1), 0.35, 1.25)     # [N, 6]
    dist = np.linalg.norm(p - alpha[..., None] * _PALETTE, axis=-1)
    return dist.argmin(-1)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a bool [H, W] mask, largest first (ties: scan order).
    Returns one bool [H, W] mask per component."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    comps: list[np.ndarray] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        label = len(comps) + 1
        labels[y0, x0] = label
        stack = [(y0, x0)]
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                        labels[yy, xx] = label
                        stack.append((yy, xx))
        comps.append(labels == label)
    comps.sort(key=lambda m: -int(m.sum()))  # stable: ties keep scan order
    return comps


def _look(img: np.ndarray, region: np.ndarray, want: ParsedObject) -> ObjectVerdict:
    v = ObjectVerdict(want.colour, want.shape, want.side)
    fg = (img.max(-1) >= FG_THRESHOLD) & region
    comps = [c for c in components(fg) if c.sum() >= MIN_AREA]
    if not comps:
        return v
    obj = comps[0]
    v.found, v.n_extra, v.area = True, len(comps) - 1, int(obj.sum())
    idx = classify_pixels(img[obj])
    counts = np.bincount(idx, minlength=len(_NAMES))
    v.colour_fractions = {_NAMES[i]: float(counts[i] / counts.sum()) for i in np.argsort(-counts, kind="stable")
                          if counts[i]}
    v.colour = _NAMES[int(np.argmax(counts))]
    ys, xs = np.nonzero(obj)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    v.bbox = (x0, y0, x1, y1)
    ious = []
    for shape in SHAPES:
        t = shape_mask(shape, x0, y0, x1 - x0, y1 - y0, *obj.shape)
        ious.append(float((t & obj).sum() / (t | obj).sum()))
    best = int(np.argmax(ious))
    v.shape, v.shape_iou = SHAPES[best], ious[best]
    return v


def judge(image: Any, prompt: str) -> Verdict:
    """Judge one generated image against its toy-grammar prompt.

    image: PIL image or array accepted by `to_uint8`, any square size (halves split at width/2;
    the renderer's geometry assumes 32x32). prompt: a caption of the toy grammar.
    Returns a `Verdict`. Raises ValueError when the prompt is outside the grammar.
    """
    wanted = parse_prompt(prompt)
    if wanted is None:
        raise ValueError(f"prompt {prompt!r} is outside the toy grammar; the oracle cannot judge it")
    img = to_uint8(image)
    h, w, _ = img.shape
    half = w // 2
    xs = np.arange(w)[None, :].repeat(h, 0)
    regions = {"any": np.ones((h, w), bool), "left": xs < half, "right": xs >= half}
    objs = [_look(img, regions[o.side], o) for o in wanted]

    for o in objs:
        if not o.found:
            o.errors.append("missing_object")
        elif o.n_extra:
            o.errors.append("extra_object")
    if len(objs) == 1:
        o = objs[0]
        if o.found and o.colour != o.expected_colour:
            o.errors.append("wrong_colour")
        if o.found and o.shape != o.expected_shape:
            o.errors.append("wrong_shape")
        return Verdict(prompt, objs)

    a, b = objs
    both = a.found and b.found
    distinct_c = a.expected_colour != b.expected_colour
    distinct_s = a.expected_shape != b.expected_shape
    c_swap = both and distinct_c and a.colour == b.expected_colour and b.colour == a.expected_colour
    s_swap = both and distinct_s and a.shape == b.expected_shape and b.shape == a.expected_shape
    if c_swap and s_swap:
        for o in objs:
            o.errors.append("position_swap")
        return Verdict(prompt, objs)
    for o, other in ((a, b), (b, a)):
        if not o.found:
            continue
        if c_swap:
            o.errors.append("colour_swap")
        elif distinct_c and o.colour == other.expected_colour:
            o.errors.append("colour_leakage")
        elif o.colour != o.expected_colour:
            o.errors.append("wrong_colour")
        elif distinct_c and o.colour_fractions.get(other.expected_colour, 0.0) >= LEAK_FRACTION:
            o.errors.append("colour_leakage")
        if s_swap:
            o.errors.append("shape_swap")
        elif o.shape != o.expected_shape:
            o.errors.append("wrong_shape")
    return Verdict(prompt, objs)


def score(verdicts: Iterable[Verdict]) -> dict[str, Any]:
    """Aggregate verdicts into rates over prompts (fractions in [0, 1]).

    Returns {"n", "colour" (all objects' colours right), "shape" (all shapes right), "correct"
    (everything right), "binding" (pairs only, else None), "errors" (error type -> number of
    prompts showing it)}. Raises ValueError when given no verdicts.
    """
    vs = list(verdicts)
    if not vs:
        raise ValueError("no verdicts to score")
    n = len(vs)
    pairs = [v for v in vs if v.n_objects == 2]
    errors = Counter(e for v in vs for e in v.errors)
    return {
        "n": n,
        "colour": sum(v.colour_correct for v in vs) / n,
        "shape": sum(v.shape_correct for v in vs) / n,
        "correct": sum(v.correct for v in vs) / n,
        "binding": (sum(bool(v.binding_correct) for v in pairs) / len(pairs)) if pairs else None,
        "errors": dict(sorted(errors.items())),
    }
