"""Attribution targets: the quantity an attribution graph explains, and how to choose them.

A target is turned into a :class:`Readout` of the Local Replacement Model: a linear function of
one *site* (the MLP input x of a covered layer and stream, or the transformer output) plus a
constant,

    value = sum_k weights[k] . site[positions[k]] + const.

- :class:`FeatureTarget` (layer, stream, feature) at a position, at its top position, or summed
  over the positions where it fires. Its value is the transcoder pre-activation (facts §1)
  ``h = W_enc[f] . (x * (1 + scale) + shift) + b_enc[f]``, so weights = ``W_enc[f] * (1 + scale)``
  and const = ``W_enc[f] . shift + b_enc[f]`` (FiLM scale/shift at the step's sigma).
- :class:`OutputTarget`: the predicted velocity of a set of image patches (a region) projected on
  a direction in the packed latent channels (e.g. a colour direction, or the difference of two
  outputs): ``value = sum_{p in region} d . v[p]``.

Target specs (strings, for ``atlas trace --target``) are parsed by :func:`parse_target_spec`:

    L2.img.17            feature 17 of layer 2, image stream, at its top position
    L2.img.17@5          ... at position 5        L2.txt.17@sum   ... summed over firing positions
    top5                 the 5 most active features (max activation over positions) of the step
    top5:L2,3:img        ... restricted to layers 2 and 3, image stream
    file:features.txt    a named feature list, one "L2.img.17[@pos]" (or "2 img 17") per line
    output:all:self      the whole image's velocity on its own mean direction
    output:rows=0-3,cols=2-5:rgb=1,0,0   a patch box; direction that makes the denoised region red
    output:patches=3,4,11:dir=0.1,...    explicit patch list and direction (C floats)
    output:mask=FILE.npy:self            a boolean mask over the token grid (or pixels) as region
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "TargetError", "NotFiring", "Readout", "FeatureTarget", "OutputTarget", "TargetSpec",
    "parse_target_spec", "parse_feature", "velocity_colour_direction",
]


class TargetError(ValueError):
    """A target that cannot be attributed on this prompt and step; the graph is recorded empty
    with this message as its reason (or the trace is refused up front for a bad spec)."""


class NotFiring(TargetError):
    """The target feature does not fire (z = 0) where it was asked for."""


@dataclass
class Readout:
    """A linear read-out of the LRM (see the module docstring).

    site: (layer, stream) for a covered MLP input [S_s, d], or ("out",) for the output [S_img, C].
    positions: [k] long; weights: [k, dim] (attribution dtype); const: scalar added (encoder bias
    and FiLM shift terms); value: the target's value computed from the recording pass (the
    pre-activation or projection); layer_limit: sources live at layers < layer_limit.
    kind, layer, stream, feature, position (None when summed or a region), label: description.
    """

    site: tuple
    positions: Tensor
    weights: Tensor
    const: float
    value: float
    layer_limit: int
    kind: str
    label: str
    layer: int | None = None
    stream: str | None = None
    feature: int | None = None
    position: int | None = None
    extra: dict = field(default_factory=dict)


def _check_covered(lrm, layer: int, stream: str) -> None:
    if (layer, stream) not in lrm.codes:
        have = ", ".join(f"L{l}.{s}" for l, s in lrm.covered)
        raise TargetError(f"layer {layer} stream {stream} has no transcoder (covered: {have})")


@dataclass(frozen=True)
class FeatureTarget:
    """Transcoder feature (layer, stream, feature) at ``position``: an int, "top" (the position of
    its largest activation) or "sum" (sum of pre-activations over the positions where it fires).
    Text padding positions (>= n_text_tokens) are skipped by "top" and "sum"."""

    layer: int
    stream: str
    feature: int
    position: int | str = "top"

    @property
    def key(self) -> str:
        return f"L{self.layer}.{self.stream}.{self.feature}@{self.position}"

    @torch.no_grad()
    def readout(self, lrm, n_text_tokens: int | None = None) -> Readout:
        """The pre-activation read-out on ``lrm`` (a LocalReplacementModel).

        Raises:
            TargetError: the layer/stream has no transcoder, the feature index or position is out
                of range; NotFiring: the feature is inactive at the requested position(s).
        """
        _check_covered(lrm, self.layer, self.stream)
        tc = lrm.transcoders[f"{self.stream}_{self.layer}"]
        if not 0 <= self.feature < tc.d_feat:
            raise TargetError(f"feature {self.feature} out of range: L{self.layer}.{self.stream} has {tc.d_feat} features")
        n = lrm.n_tokens[self.stream]
        all_pos = torch.arange(n, device=tc.encoder.weight.device)
        h = lrm.preactivation(self.layer, self.stream, all_pos, torch.full_like(all_pos, self.feature))
        usable = n if self.stream == "img" or n_text_tokens is None else min(n, n_text_tokens)
        where = f"on this prompt at step {lrm.step}"
        if isinstance(self.position, int) and not isinstance(self.position, bool):
            if not 0 <= self.position < n:
                raise TargetError(f"position {self.position} out of range: stream {self.stream} has {n} positions")
            if h[self.position] <= 0:
                firing = (h[:usable] > 0).nonzero().flatten().tolist()
                raise NotFiring(f"{self.key} does not fire at position {self.position} {where} (pre-activation "
                                f"{float(h[self.position]):.4g}); it fires at positions {firing[:20]}")
            positions = torch.tensor([self.position], device=all_pos.device)
        elif self.position in ("top", "sum"):
            if usable == 0 or float(h[:usable].max()) <= 0:
                raise NotFiring(f"{self.key} never fires {where} (max pre-activation "
                                f"{float(h[:usable].max()) if usable else float('nan'):.4g})")
            positions = (h[:usable].argmax().reshape(1) if self.position == "top"
                         else (h[:usable] > 0).nonzero().flatten())
        else:
            raise TargetError(f"position must be an int, 'top' or 'sum', got {self.position!r}")
        scale, shift = tc.modulation(lrm.sigma)
        w_enc = tc.encoder.weight[self.feature]
        weights = (w_enc * (1 + scale[0]))[None].expand(len(positions), -1)
        const = float(len(positions) * (w_enc @ shift[0] + tc.encoder.bias[self.feature]))
        pos = int(positions[0]) if len(positions) == 1 and self.position != "sum" else None
        return Readout(site=(self.layer, self.stream), positions=positions, weights=weights, const=const,
                       value=float(h[positions].sum()), layer_limit=self.layer, kind="feature",
                       label=f"L{self.layer}.{self.stream}.f{self.feature}@{self.position if pos is None else pos}",
                       layer=self.layer, stream=self.stream, feature=self.feature, position=pos,
                       extra={"positions": positions.tolist()})


@dataclass(frozen=True)
class OutputTarget:
    """Predicted velocity of image patches ``positions`` (row-major token indices) projected on
    ``direction``: C floats (packed latent channels), or "self" (the unit mean velocity of the
    region, so the value is the region's velocity magnitude along its own mean). ``name`` labels
    the direction (e.g. "rgb=1,0,0")."""

    positions: tuple[int, ...]
    direction: tuple[float, ...] | str = "self"
    name: str = ""
    region: str = ""

    @property
    def key(self) -> str:
        return f"output:{self.region or 'patches=' + ','.join(map(str, self.positions))}:{self.name or self.direction}"

    @torch.no_grad()
    def readout(self, lrm, n_text_tokens: int | None = None) -> Readout:
        """The projection read-out on ``lrm``.

        Raises:
            TargetError: empty region, a position outside the image stream, a direction of the
                wrong length or of zero norm.
        """
        n, c = lrm.output.shape
        if not self.positions:
            raise TargetError("the output region is empty")
        bad = [p for p in self.positions if not 0 <= p < n]
        if bad:
            raise TargetError(f"image positions {bad[:5]} out of range (the image stream has {n} patches)")
        pos = torch.tensor(sorted(set(self.positions)), device=lrm.output.device)
        if self.direction == "self":
            d = lrm.output[pos].mean(0)
        elif isinstance(self.direction, str):
            raise TargetError(f"output direction {self.direction!r} is not resolved (rgb= directions need the "
                              "pipeline: parse_target_spec(..., pipe=pipe))")
        else:
            d = torch.as_tensor(self.direction, dtype=lrm.dtype, device=lrm.output.device)
            if d.shape != (c,):
                raise TargetError(f"direction has {d.numel()} values, the output has {c} channels")
        norm = float(d.norm())
        if not norm > 0 or not math.isfinite(norm):
            raise TargetError("the output direction has zero (or non-finite) norm")
        d = (d / norm).to(lrm.dtype)
        weights = d[None].expand(len(pos), -1)
        return Readout(site=("out",), positions=pos, weights=weights, const=0.0,
                       value=float((lrm.output[pos] * d).sum()), layer_limit=10 ** 9, kind="output",
                       label=f"output[{len(pos)} patches]·{self.name or self.direction}", stream="img",
                       extra={"positions": pos.tolist(), "direction": d.tolist()})

    @classmethod
    def contrast(cls, positions, output_a: Tensor, output_b: Tensor, name: str = "a-b") -> "OutputTarget":
        """Direction = mean over the region of ``output_a - output_b`` (two velocities [S_img, C],
        e.g. of two prompts or seeds): what pushes this region towards output a."""
        pos = list(positions)
        d = (output_a[pos] - output_b[pos]).double().mean(0)
        return cls(tuple(pos), tuple(float(x) for x in d), name=name)


@torch.no_grad()
def velocity_colour_direction(pipe, rgb: tuple[float, float, float], height: int, width: int,
                              reference: tuple[float, float, float] = (0.5, 0.5, 0.5)) -> Tensor:
    """A direction [C] on the predicted velocity that makes the denoised image more ``rgb``.

    Flow matching: ``x0_hat = x_t - sigma * v``, so pushing x0 along the latent colour direction
    ``l = pack(E(rgb image)) - pack(E(reference image))`` (VAE encoder mean, scaled/shifted as the
    pipeline does, averaged over patches) means moving v along ``-l``. Colours in [0, 1].
    Returns the unit vector ``-l / |l|`` (float32).
    """
    vae = pipe.vae
    dev, dt = next(vae.parameters()).device, next(vae.parameters()).dtype

    def latent(colour):
        img = torch.tensor(colour, device=dev, dtype=dt).reshape(1, 3, 1, 1).expand(1, 3, height, width) * 2 - 1
        lat = vae.encode(img).latent_dist.mean
        lat = (lat - vae.config.shift_factor) * vae.config.scaling_factor
        packed = pipe._pack_latents(lat, 1, lat.shape[1], lat.shape[2], lat.shape[3])
        return packed[0].float().mean(0)

    d = -(latent(rgb) - latent(reference))
    return d / d.norm().clamp_min(1e-12)


_FEATURE_RE = re.compile(r"^L(\d+)\.(img|txt)\.(\d+)(?:@(top|sum|\d+))?$")
_PLAIN_RE = re.compile(r"^(\d+)[\s,]+(img|txt)[\s,]+(\d+)(?:[\s,]+(top|sum|\d+))?$")


def parse_feature(text: str) -> FeatureTarget:
    """Parse "L2.img.17[@top|@sum|@5]" or "2 img 17 [pos]" into a FeatureTarget.

    Raises: TargetError for anything else.
    """
    text = text.strip()
    m = _FEATURE_RE.match(text) or _PLAIN_RE.match(text)
    if not m:
        raise TargetError(f"not a feature target: {text!r} (expected e.g. 'L2.img.17', 'L2.txt.5@sum', 'L1.img.9@12')")
    pos = m.group(4) or "top"
    return FeatureTarget(int(m.group(1)), m.group(2), int(m.group(3)), int(pos) if pos.isdigit() else pos)


@dataclass
class TargetSpec:
    """A parsed ``--target`` spec; :meth:`expand` gives the targets for one prompt and step.

    kind: "feature" (one target), "list" (named features), "top" (automatic: the ``n`` most
    active features in ``layers``/``streams``), "output". ``n_graphs`` is known before any model
    runs, so a resumed trace can skip finished graphs without recomputing anything.
    """

    text: str
    kind: str
    targets: list = field(default_factory=list)
    n: int = 0
    layers: list[int] | None = None
    streams: list[str] | None = None

    @property
    def n_graphs(self) -> int:
        return self.n if self.kind == "top" else len(self.targets)

    def expand(self, lrm, n_text_tokens: int | None = None) -> list:
        """Targets (FeatureTarget / OutputTarget) for this LRM, ``n_graphs`` of them at most.
        "top" ranks features by their largest activation over positions (text padding skipped),
        ties broken by (layer, stream, feature); fewer than n are returned if fewer fire."""
        if self.kind != "top":
            return list(self.targets)
        best: dict[tuple, float] = {}
        for (layer, stream), codes in lrm.codes.items():
            if self.layers is not None and layer not in self.layers:
                continue
            if self.streams is not None and stream not in self.streams:
                continue
            keep = codes.positions < n_text_tokens if stream == "txt" and n_text_tokens is not None else slice(None)
            for f, v in zip(codes.features[keep].tolist(), codes.values[keep].tolist()):
                key = (layer, stream, f)
                best[key] = max(best.get(key, 0.0), v)
        ranked = sorted(best.items(), key=lambda kv: (-kv[1], kv[0][0], kv[0][1], kv[0][2]))[: self.n]
        return [FeatureTarget(l, s, f, "top") for (l, s, f), _ in ranked]


def _int_range(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def _parse_region(text: str, grid_w: int, n_img: int) -> tuple[tuple[int, ...], str]:
    if text == "all":
        return tuple(range(n_img)), "all"
    if text.startswith("patches="):
        return tuple(_int_range(text[8:])), text
    if text.startswith("mask="):
        import numpy as np

        path = Path(text[5:])
        if path.suffix == ".npy":
            mask = np.load(path)
        else:
            from PIL import Image

            mask = np.asarray(Image.open(path).convert("L")) > 127
        mask = np.asarray(mask).astype(bool)
        grid_h = n_img // grid_w
        if mask.shape != (grid_h, grid_w):  # a pixel mask: a patch belongs if any pixel is set
            if mask.shape[0] % grid_h or mask.shape[1] % grid_w:
                raise TargetError(f"mask shape {mask.shape} is neither the token grid {(grid_h, grid_w)} nor a multiple")
            fh, fw = mask.shape[0] // grid_h, mask.shape[1] // grid_w
            mask = mask.reshape(grid_h, fh, grid_w, fw).any(axis=(1, 3))
        return tuple(int(i) for i in np.flatnonzero(mask.reshape(-1))), text
    m = re.fullmatch(r"rows=([\d,-]+),cols=([\d,-]+)", text)
    if m:
        rows, cols = _int_range(m.group(1)), _int_range(m.group(2))
        return tuple(r * grid_w + c for r in rows for c in cols), text
    raise TargetError(f"unknown region {text!r}: use all, rows=A-B,cols=C-D, patches=I,J,... or mask=FILE")


def parse_target_spec(text: str, *, grid_w: int | None = None, n_img: int | None = None, pipe=None,
                      height: int | None = None, width: int | None = None) -> TargetSpec:
    """Parse a ``--target`` spec (grammar in the module docstring).

    Output specs need the image token grid (``grid_w``, ``n_img``); "rgb=" directions are
    computed with the pipeline's VAE and the generation size; without ``pipe`` they are only
    checked (the target's direction stays the string until parsed again with the pipeline).

    Raises:
        TargetError: malformed spec, unreadable feature list, or an output spec without the
            information it needs.
    """
    text = text.strip()
    if text.startswith("top"):
        m = re.fullmatch(r"top(\d+)((?::[^:]+)*)", text)
        if not m or int(m.group(1)) < 1:
            raise TargetError(f"bad automatic target {text!r}: use topN[:L2,3][:img|txt] with N >= 1")
        spec = TargetSpec(text, "top", n=int(m.group(1)))
        for part in filter(None, m.group(2).split(":")):
            if part.startswith("L"):
                spec.layers = _int_range(part[1:])
            elif part in ("img", "txt", "img,txt", "txt,img"):
                spec.streams = part.split(",")
            else:
                raise TargetError(f"bad part {part!r} in {text!r}: expected L<layers> or img/txt")
        return spec
    if text.startswith("file:"):
        path = Path(text[5:])
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise TargetError(f"cannot read feature list {path}: {e.strerror}") from e
        targets = []
        for i, line in enumerate(lines, 1):
            line = line.split("#")[0].strip()
            if line:
                try:
                    targets.append(parse_feature(line))
                except TargetError as e:
                    raise TargetError(f"{path}:{i}: {e}") from None
        if not targets:
            raise TargetError(f"{path}: no feature listed")
        return TargetSpec(text, "list", targets=targets)
    if text.startswith("output:"):
        if grid_w is None or n_img is None:
            raise TargetError("output targets need the image token grid")
        parts = text.split(":")
        if len(parts) != 3:
            raise TargetError(f"bad output target {text!r}: use output:REGION:DIRECTION")
        positions, region = _parse_region(parts[1], grid_w, n_img)
        dspec = parts[2]
        if dspec == "self":
            direction, name = "self", "self"
        elif dspec.startswith("rgb="):
            try:
                rgb = tuple(float(x) for x in dspec[4:].split(","))
            except ValueError:
                rgb = ()
            if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
                raise TargetError(f"rgb= takes three numbers in [0, 1], got {dspec!r}")
            if pipe is None:  # checked, resolved later (needs the VAE): readout refuses it until then
                direction, name = dspec, dspec
            else:
                d = velocity_colour_direction(pipe, rgb, height, width)
                direction, name = tuple(float(x) for x in d), dspec
        elif dspec.startswith("dir="):
            direction, name = tuple(float(x) for x in dspec[4:].split(",")), "dir"
        else:
            raise TargetError(f"unknown direction {dspec!r}: use self, rgb=R,G,B or dir=v1,v2,...")
        return TargetSpec(text, "output", targets=[OutputTarget(positions, direction, name=name, region=region)])
    return TargetSpec(text, "feature", targets=[parse_feature(text)])
