"""Small inline SVG plots of the report: colour map and colour bar, the blocky per-patch heatmap
over an image crop, histograms, per-step charts and grouped bar charts.

Every function returns markup as a :class:`markupsafe.Markup` string; every piece of text that
goes into it (titles, labels) is escaped here, so callers may pass prompt text or labels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from markupsafe import Markup, escape

# A perceptually ordered dark-to-bright map (anchors of matplotlib's "inferno").
_ANCHORS = [(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
            (250, 193, 39), (252, 255, 164)]
STREAM_COLOURS = {"txt": "#7b3fa0", "img": "#d98c00"}
SIGN_COLOURS = {True: "#1f6fb4", False: "#c8352b"}  # positive, negative


def fmt(value: object, digits: int = 3) -> str:
    """A number in ``digits`` significant digits (integers as they are); ``—`` for None/NaN."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):
        return "—"
    if v == 0:
        return "0"
    if abs(v) >= 10 ** digits or abs(v) < 10 ** -3:
        return f"{v:.{max(digits - 1, 1)}e}"
    return f"{v:.{digits}g}"


def colormap(t: float) -> str:
    """Colour of ``t`` in [0, 1] (clipped) as ``#rrggbb``."""
    t = 0.0 if t != t else min(max(t, 0.0), 1.0)
    x = t * (len(_ANCHORS) - 1)
    i = min(int(x), len(_ANCHORS) - 2)
    f = x - i
    a, b = _ANCHORS[i], _ANCHORS[i + 1]
    return "#%02x%02x%02x" % tuple(round(a[k] + (b[k] - a[k]) * f) for k in range(3))


def _c(x: float) -> str:
    """A pixel coordinate, rounded (the plots are drawn at 1 unit = 1 CSS pixel)."""
    return str(round(x))


def colorbar(vmax: float, label: str = "activation") -> Markup:
    """Colour bar of the heatmap colours from 0 to ``vmax`` with raw-value ticks (HTML; the
    gradient itself is the ``.cbar-grad`` rule of :func:`colorbar_css`)."""
    ticks = "".join(f"<span>{escape(fmt(vmax * i / 4))}</span>" for i in range(5))
    return Markup(f'<div class="colorbar" role="img" aria-label="colour bar, 0 to {escape(fmt(vmax))}">'
                  f'<div class="cbar-grad"></div><div class="cbar-ticks">{ticks}</div>'
                  f'<div class="muted">{escape(label)}</div></div>')


def colorbar_css() -> str:
    """The stylesheet rule of the colour bar's gradient, from the same colour map as the heatmaps."""
    stops = ", ".join(f"{colormap(i / 8)} {100 * i / 8:g}%" for i in range(9))
    return f".cbar-grad {{ background: linear-gradient(to right, {stops}); }}\n"


def crop_window(peak: int, cols: int, rows: int, span: int) -> tuple[int, int, int, int]:
    """Patch window (c0, r0, c1, r1), at most ``span`` patches a side, centred on patch ``peak``
    and clamped to the grid."""
    pc, pr = peak % cols, peak // cols
    w, h = min(span, cols), min(span, rows)
    c0 = min(max(pc - w // 2, 0), cols - w)
    r0 = min(max(pr - h // 2, 0), rows - h)
    return c0, r0, c0 + w, r0 + h


def crop_heatmap(href: str, width: int, height: int, patch_px: int, cells: Sequence[tuple[int, float]],
                 peak: int, vmax: float, span: int = 12, size: int = 128, title: str = "") -> Markup:
    """A crop of a generated image around patch ``peak`` with the feature's activation drawn per
    patch (one flat block per patch, colour = value / vmax); the peak patch is outlined.

    ``href`` is the (upscaled) image file; coordinates are in the original image's pixels, so the
    crop is exact whatever the upscaling. ``cells`` are (patch position, value) pairs.
    """
    cols, rows = max(width // patch_px, 1), max(height // patch_px, 1)
    c0, r0, c1, r1 = crop_window(peak, cols, rows, span)
    x0, y0, w, h = c0 * patch_px, r0 * patch_px, (c1 - c0) * patch_px, (r1 - r0) * patch_px
    vmax = vmax or 1.0
    rects = []
    for pos, value in cells:
        c, r = pos % cols, pos // cols
        if c0 <= c < c1 and r0 <= r < r1 and value > 0:
            rects.append(f'<rect x="{c * patch_px}" y="{r * patch_px}" width="{patch_px}" height="{patch_px}" '
                         f'fill="{colormap(value / vmax)}"/>')
    pc, pr = peak % cols, peak // cols
    ph = size * h // max(w, 1)
    image = f'<image href="{escape(href)}" width="{width}" height="{height}"/>' if href else ""
    return Markup(
        f'<svg class="crop" width="{size}" height="{ph}" viewBox="{x0} {y0} {w} {h}">{_title(title)}'
        f'{image}<g class="heat"><rect class="dim" x="{x0}" y="{y0}" width="{w}" height="{h}"/>{"".join(rects)}</g>'
        f'<rect class="peak" x="{pc * patch_px}" y="{pr * patch_px}" width="{patch_px}" height="{patch_px}"/></svg>')


def _title(text: str) -> str:
    return f"<title>{escape(text)}</title>" if text else ""


def token_background(value: float, vmax: float) -> str:
    """CSS background of a token shaded by activation (transparent when it did not fire)."""
    if not value or value <= 0:
        return "transparent"
    t = min(value / (vmax or 1.0), 1.0)
    return colormap(0.25 + 0.75 * t)


def token_foreground(value: float, vmax: float) -> str:
    """Readable text colour on :func:`token_background`."""
    if not value or value <= 0:
        return "inherit"
    return "#000" if value / (vmax or 1.0) > 0.45 else "#fff"


def shaded_tokens(tokens: Sequence[str], values: dict[int, float], peak: int, vmax: float,
                  context: int = 12) -> Markup:
    """A prompt's tokens shaded by activation (value in the tooltip), ``peak`` underlined; only
    ``context`` tokens either side of the peak are shown (plus every token that fired), elided
    with an ellipsis. Compact markup: ``<i>`` plain, ``<b>`` shaded (styled by the stylesheet)."""
    out, last = [], -1
    for i, tok in enumerate(tokens):
        v = values.get(i, 0.0)
        if abs(i - peak) > context and v <= 0:
            continue
        if i > last + 1:
            out.append('<i class="gap">…</i>')
        last = i
        if v > 0:
            cls = ' class="p"' if i == peak else ""
            out.append(f'<b{cls} style="background:{token_background(v, vmax)};color:{token_foreground(v, vmax)}" '
                       f'title="{escape(fmt(v))}">{escape(tok)}</b>')
        else:
            out.append(f"<i>{escape(tok)}</i>")
    if last < len(tokens) - 1:
        out.append('<i class="gap">…</i>')
    return Markup("".join(out))


def histogram(counts: Sequence[int], vmax: float, width: int = 180, height: int = 70,
              title: str = "") -> Markup:
    """Bars of an activation histogram with equal bins over (0, ``vmax``]; x ticks in raw values."""
    n = max(len(counts), 1)
    top = max(max(counts, default=0), 1)
    pw, ph, left, base = width - 10, height - 30, 5, height - 16
    path = []
    for i, c in enumerate(counts):
        if c:
            bh = ph * c / top
            x0, x1 = round(left + pw * i / n), round(left + pw * (i + 0.9) / n)
            path.append(f"M{x0} {base}h{x1 - x0}v{-max(round(bh), 1)}h{x0 - x1}z")
    return Markup(
        f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
        f'{_title(title)}<path d="{"".join(path)}" fill="#5a6f8f"/>'
        f'<line x1="{left}" y1="{base}" x2="{left + pw}" y2="{base}" stroke="#444" stroke-width=".6"/>'
        f'<text x="{left}" y="{height - 4}">0</text>'
        f'<text x="{left + pw}" y="{height - 4}" text-anchor="end">{escape(fmt(vmax))}</text>'
        f'<text x="{left}" y="9" class="muted">count (max {top})</text></svg>')


def step_chart(labels: Sequence[str], series: dict[str, Sequence[float | None]], width: int = 260,
               height: int = 120, title: str = "", bars: bool = False) -> Markup:
    """Values per denoising step: one polyline (or bar group with ``bars``) per series, y from 0."""
    colours = ["#1f6fb4", "#d98c00", "#2a9d5c", "#7b3fa0"]
    vals = [v for s in series.values() for v in s if v is not None]
    top = max(vals, default=0) or 1.0
    left, right, tp, base = 38, width - 8, 16, height - 30
    n = max(len(labels), 1)
    step_w = (right - left) / n

    def xy(i: int, v: float) -> tuple[float, float]:
        return left + step_w * (i + 0.5), base - (base - tp) * v / top

    parts = [f'<line x1="{left}" y1="{base}" x2="{right}" y2="{base}" stroke="#444" stroke-width=".6"/>',
             f'<line x1="{left}" y1="{tp}" x2="{left}" y2="{base}" stroke="#444" stroke-width=".6"/>',
             f'<text x="{left - 3}" y="{tp + 4}" text-anchor="end">{escape(fmt(top))}</text>',
             f'<text x="{left - 3}" y="{base}" text-anchor="end">0</text>']
    for i, lab in enumerate(labels):
        first, _, second = lab.partition(" ")
        x = _c(left + step_w * (i + 0.5))
        parts.append(f'<text x="{x}" y="{height - 17}" text-anchor="middle">{escape(first)}</text>'
                     f'<text x="{x}" y="{height - 5}" text-anchor="middle" class="muted">{escape(second)}</text>')
    k = max(len(series), 1)
    for j, (name, values) in enumerate(series.items()):
        col = colours[j % len(colours)]
        if bars:
            bw = step_w * 0.8 / k
            for i, v in enumerate(values):
                if v:
                    x, y = xy(i, v)
                    parts.append(f'<rect x="{_c(x - step_w * 0.4 + j * bw)}" y="{_c(y)}" width="{_c(bw)}" '
                                 f'height="{_c(base - y)}" fill="{col}"><title>{escape(name)}: {escape(fmt(v))}'
                                 f'</title></rect>')
        else:
            pts = [xy(i, v) for i, v in enumerate(values) if v is not None]
            if pts:
                parts.append(f'<polyline points="{" ".join(f"{_c(x)},{_c(y)}" for x, y in pts)}" fill="none" '
                             f'stroke="{col}" stroke-width="1.6"/>')
                parts += [f'<circle cx="{_c(x)}" cy="{_c(y)}" r="2.2" fill="{col}"/>' for x, y in pts]
        parts.append(f'<rect x="{left + 6 + 70 * j}" y="2" width="8" height="8" fill="{col}"/>'
                     f'<text x="{left + 17 + 70 * j}" y="10">{escape(name)}</text>')
    return Markup(f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
                  f'role="img"><title>{escape(title)}</title>{"".join(parts)}</svg>')


def grouped_bars(categories: Sequence[str], series: dict[str, Sequence[float | None]],
                 colours: dict[str, str], width: int = 420, height: int = 190, title: str = "",
                 ylabel: str = "") -> Markup:
    """Grouped bar chart: one group per category (e.g. layer), one bar per series (e.g. stream and
    role); missing values are left out. Each bar has a tooltip with its value."""
    vals = [v for s in series.values() for v in s if v is not None]
    top = max(vals, default=0) or 1.0
    left, right, tp, base = 44, width - 8, 22, height - 42
    n, k = max(len(categories), 1), max(len(series), 1)
    gw = (right - left) / n
    bw = gw * 0.8 / k
    parts = [f'<line x1="{left}" y1="{base}" x2="{right}" y2="{base}" stroke="#444" stroke-width=".6"/>',
             f'<text x="{left - 3}" y="{tp + 4}" text-anchor="end">{escape(fmt(top))}</text>',
             f'<text x="{left - 3}" y="{base}" text-anchor="end">0</text>',
             f'<text x="4" y="12" class="muted">{escape(ylabel)}</text>']
    for i, cat in enumerate(categories):
        parts.append(f'<text x="{_c(left + gw * (i + 0.5))}" y="{base + 13}" text-anchor="middle">{escape(cat)}</text>')
    for j, (name, values) in enumerate(series.items()):
        col = colours.get(name, "#888")
        for i, v in enumerate(values):
            if v is None:
                continue
            h = (base - tp) * max(v, 0) / top
            parts.append(f'<rect x="{_c(left + gw * i + gw * 0.1 + j * bw)}" y="{_c(base - h)}" width="{_c(bw)}" '
                         f'height="{_c(h)}" fill="{col}"><title>{escape(name)} {escape(categories[i])}: '
                         f'{escape(fmt(v))}</title></rect>')
        lx = left + (j % 4) * ((right - left) / 4)
        ly = height - 8 + 12 * (j // 4)
        parts.append(f'<rect x="{_c(lx)}" y="{ly - 7}" width="8" height="8" fill="{col}"/>'
                     f'<text x="{_c(lx + 11)}" y="{ly}">{escape(name)}</text>')
    height += 12 * ((k - 1) // 4)
    return Markup(f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
                  f'role="img"><title>{escape(title)}</title>{"".join(parts)}</svg>')
