"""The attribution graph drawn as a layered diagram (inline SVG).

Rows from bottom to top: the inputs (embeddings entering the first covered block), then each
covered layer, then the output (for output targets; a feature target sits in its own layer's
row). In every row text-stream nodes are on the left and image-stream nodes on the right, in
distinct colours. Edges are curves from source (below) to target (above), their width by
|attribution| and their colour by sign. Feature nodes (and a feature target) link to their
feature pages; every node has a tooltip. Large graphs are cut to the most influential nodes and
strongest edges, and the caller is told how many were left out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from markupsafe import Markup, escape

from atlas.report.svg import SIGN_COLOURS, STREAM_COLOURS, fmt

DX_MIN, DX_MAX, ROW_H, MARGIN_L, MARGIN_R, TOP, BOTTOM = 24, 90, 84, 70, 20, 34, 40
TARGET_WIDTH = 1100  # px: spacing grows up to DX_MAX so small graphs fill the page


@dataclass
class GraphDrawing:
    """The SVG and what it left out."""

    svg: Markup
    nodes_shown: int
    nodes_total: int
    edges_shown: int
    edges_total: int


def _row(n: dict, output_row: int) -> int:
    if n["node_type"] == "input" or n["layer"] is None:
        return output_row if n["node_type"] == "target" else -1
    return int(n["layer"])


def _label(n: dict, token_of: Callable[[str, int], str | None]) -> str:
    kind, stream, pos = n["node_type"], n["stream"], n["position"]
    where = ""
    if pos is not None:
        tok = token_of(stream, pos) if stream == "txt" else None
        where = f" @{stream} {pos}" + (f" {tok!r}" if tok is not None else "")
    if n["feature"] is not None and n["layer"] is not None:
        name = f"L{n['layer']}.{stream}.{n['feature']}"
    elif kind == "error":
        name = f"error L{n['layer']}.{stream}"
    elif kind == "input":
        name = f"input {stream}"
    else:
        name = f"{kind} {stream or ''}".strip()
    role = " (target)" if kind == "target" else ""
    return (f"{name}{role}{where} | activation {fmt(n['activation'])}, influence {fmt(n['influence'])}")


def select(nodes: list[dict], edges: list[dict], max_nodes: int, max_edges: int) -> tuple[list[dict], list[dict]]:
    """Nodes and edges to draw: the target, then nodes with at least one edge by |influence| (at
    most ``max_nodes``); the strongest ``max_edges`` edges among them."""
    connected = {e["source"] for e in edges} | {e["target"] for e in edges}
    targets = [n for n in nodes if n["node_type"] == "target"]
    rest = [n for n in nodes if n["node_type"] != "target" and n["node"] in connected]
    rest.sort(key=lambda n: -abs(n["influence"] or 0.0))
    keep = targets + rest[: max(max_nodes - len(targets), 0)]
    ids = {n["node"] for n in keep}
    kept_edges = [e for e in edges if e["source"] in ids and e["target"] in ids]
    kept_edges.sort(key=lambda e: -abs(e["weight"]))
    return keep, kept_edges[:max_edges]


def draw_graph(nodes: list[dict], edges: list[dict], feature_href: Callable[[int, str, int], str | None],
               token_of: Callable[[str, int], str | None] = lambda s, p: None, max_nodes: int = 120,
               max_edges: int = 500) -> GraphDrawing:
    """Lay out and draw a pruned graph; see the module docstring.

    ``nodes``/``edges`` are rows of ``report_graph_nodes`` / ``report_graph_edges`` for one graph;
    ``feature_href(layer, stream, feature)`` gives the link of a feature page (None: no link).
    """
    shown, shown_edges = select(nodes, edges, max_nodes, max_edges)
    layers = sorted({int(n["layer"]) for n in shown if n["layer"] is not None})
    output_row = (max(layers) + 1) if layers else 0
    rows = sorted({_row(n, output_row) for n in shown} | {-1, *range(output_row)})
    by_row: dict[int, dict[str, list[dict]]] = {r: {"txt": [], "img": []} for r in rows}
    for n in shown:
        by_row[_row(n, output_row)]["txt" if n["stream"] == "txt" else "img"].append(n)
    for parts in by_row.values():
        for lst in parts.values():
            lst.sort(key=lambda n: (n["node_type"] != "target", n["position"] if n["position"] is not None else -1,
                                    n["feature"] if n["feature"] is not None else -1))
    n_txt = max((len(p["txt"]) for p in by_row.values()), default=0)
    n_img = max((len(p["img"]) for p in by_row.values()), default=0)
    dx = min(max((TARGET_WIDTH - MARGIN_L - MARGIN_R) / max(n_txt + n_img + 2, 1), DX_MIN), DX_MAX)
    w_txt, w_img, gap = n_txt * dx, n_img * dx, 2 * dx
    width = MARGIN_L + max(w_txt, dx) + gap + max(w_img, dx) + MARGIN_R
    height = TOP + ROW_H * max(len(rows) - 1, 0) + BOTTOM
    pos: dict[int, tuple[float, float]] = {}
    for ri, r in enumerate(rows):
        y = height - BOTTOM - ROW_H * ri
        for stream, x_start, region in (("txt", MARGIN_L, max(w_txt, dx)), ("img", MARGIN_L + max(w_txt, dx) + gap,
                                                                           max(w_img, dx))):
            lst = by_row[r][stream]
            off = x_start + (region - len(lst) * dx) / 2 + dx / 2
            for i, n in enumerate(lst):
                pos[n["node"]] = (off + i * dx, y)
    out = [f'<svg class="graph" viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" height="{height:.0f}" '
           f'role="img" aria-label="attribution graph">']
    for ri, r in enumerate(rows):
        y = height - BOTTOM - ROW_H * ri
        name = "inputs" if r == -1 else ("output" if r == output_row and r not in layers else f"layer {r}")
        out.append(f'<line x1="{MARGIN_L - 6}" y1="{y}" x2="{width - MARGIN_R}" y2="{y}" class="rowline"/>'
                   f'<text x="6" y="{y + 4}" class="rowlabel">{name}</text>')
    xdiv = MARGIN_L + max(w_txt, dx) + gap / 2
    out.append(f'<line x1="{xdiv}" y1="8" x2="{xdiv}" y2="{height - 8}" class="divider"/>'
               f'<text x="{xdiv - 6}" y="14" text-anchor="end" fill="{STREAM_COLOURS["txt"]}">text stream</text>'
               f'<text x="{xdiv + 6}" y="14" fill="{STREAM_COLOURS["img"]}">image stream</text>')
    wmax = max((abs(e["weight"]) for e in shown_edges), default=1.0) or 1.0
    for e in sorted(shown_edges, key=lambda e: abs(e["weight"])):
        (sx, sy), (tx, ty) = pos[e["source"]], pos[e["target"]]
        my = (sy + ty) / 2
        sw = 0.4 + 4.6 * abs(e["weight"]) / wmax
        out.append(f'<path d="M{sx:.1f} {sy:.1f}C{sx:.1f} {my:.1f} {tx:.1f} {my:.1f} {tx:.1f} {ty:.1f}" '
                   f'stroke="{SIGN_COLOURS[e["weight"] >= 0]}" stroke-width="{sw:.2f}" class="edge">'
                   f'<title>{escape(fmt(e["weight"]))}</title></path>')
    for n in shown:
        x, y = pos[n["node"]]
        col = STREAM_COLOURS.get(n["stream"], "#666")
        title = f"<title>{escape(_label(n, token_of))}</title>"
        kind = n["node_type"]
        if kind == "error":
            glyph = f'<rect x="{x - 5:.1f}" y="{y - 5:.1f}" width="10" height="10" fill="#fff" stroke="{col}" stroke-width="2"/>'
        elif kind == "input":
            glyph = f'<path d="M{x:.1f} {y - 6:.1f}l6 6-6 6-6-6z" fill="{col}" fill-opacity=".45" stroke="{col}"/>'
        elif kind == "target":
            glyph = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="9" fill="{col}" stroke="#111" stroke-width="2.5"/>'
        else:
            glyph = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6.5" fill="{col}" stroke="#fff"/>'
        text = ""
        if n["feature"] is not None:
            text = f'<text x="{x:.1f}" y="{y + 17:.1f}" text-anchor="middle" class="nodelabel">{int(n["feature"])}</text>'
        elif kind == "input" and n["position"] is not None:
            text = f'<text x="{x:.1f}" y="{y + 17:.1f}" text-anchor="middle" class="nodelabel">{int(n["position"])}</text>'
        href = (feature_href(int(n["layer"]), n["stream"], int(n["feature"]))
                if n["feature"] is not None and n["layer"] is not None else None)
        node = f"{glyph}{text}{title}"
        out.append(f'<a href="{escape(href)}" class="node">{node}</a>' if href else f'<g class="node">{node}</g>')
    out.append("</svg>")
    return GraphDrawing(Markup("".join(out)), len(shown), len(nodes), len(shown_edges), len(edges))
