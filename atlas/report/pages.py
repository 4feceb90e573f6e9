"""Context of each page of the report, built from :class:`atlas.report.data.ReportData`.

One function per page type returns the dict its template (``reports/<type>.html``) renders.
Every URL in a context is relative to the page (``root`` + a path of :mod:`atlas.report.links`),
so the site works from the file system. Text from prompts and labels stays plain ``str`` here and
is escaped by the templates (autoescape); SVG markup comes from :mod:`atlas.report.svg` and
:mod:`atlas.report.graphsvg`, which escape what they embed.
"""

from __future__ import annotations

import json
from collections import defaultdict

from atlas.report import links, svg
from atlas.report.graphsvg import draw_graph

MAX_LINKED = 15


def _step_label(step: int, sigma: float | None) -> str:
    return f"{step} σ={svg.fmt(sigma, 2)}" if sigma is not None else str(step)


class PageBuilder:
    """Builds page contexts from loaded report data (indexes are computed once here)."""

    def __init__(self, data, errors: dict | None = None, analyses: list | None = None):
        self.data = data
        self.errors = errors or {}
        self.errors_labelled = errors is not None
        self.analyses = analyses or []
        self.feature_by_key = {(f["run_id"], f["layer"], f["stream"], f["feature"]): f for f in data.features}
        self._prompt_links: dict[tuple, dict] = {}
        self.graphs_by_prompt: dict[tuple, list[dict]] = defaultdict(list)
        for g in data.graphs:
            self.graphs_by_prompt[(g["run_id"], g["prompt_id"])].append(g)

    # --- links -------------------------------------------------------------------------------
    def feature_link(self, root: str, run_id: str, layer: int, stream: str, feature: int) -> dict:
        """{key, href (None if no page), label} of a feature."""
        key = (run_id, layer, stream, feature)
        f = self.feature_by_key.get(key)
        return {"key": links.feature_key(layer, stream, feature),
                "href": root + links.feature_page(*key) if key in self.data.feature_set else None,
                "label": f["label"] if f else None}

    def prompt_link(self, root: str, run_id: str, prompt_id: int) -> dict:
        """{prompt_id, text, href, img} of a generation."""
        key = (root, run_id, prompt_id)
        if key not in self._prompt_links:
            self._prompt_links[key] = self._prompt_link(root, run_id, prompt_id)
        return self._prompt_links[key]

    def _prompt_link(self, root: str, run_id: str, prompt_id: int) -> dict:
        p = self.data.prompt_by_id.get((run_id, prompt_id))
        return {"prompt_id": prompt_id, "text": p["text"] if p else "(unknown prompt)",
                "href": root + links.prompt_page(run_id, prompt_id) if p else None,
                "img": self.thumb(root, p) if p else None}

    def image(self, root: str, p: dict) -> str | None:
        """URL of a generation's image in the report, or None if it has none."""
        return root + links.image_file(p["run_id"], p["prompt_id"]) if p.get("image_path") else None

    def thumb(self, root: str, p: dict) -> str | None:
        """URL of a generation's thumbnail (the image itself when it is small)."""
        if not p.get("image_path"):
            return None
        big = max(p["image_height"] or 0, p["image_width"] or 0) > 256
        return root + (links.thumb_file if big else links.image_file)(p["run_id"], p["prompt_id"])

    # --- feature pages ------------------------------------------------------------------------
    def feature_link_state(self, key: tuple) -> str:
        """Which of the features a feature page links to have pages ("1"/"0" each): besides its own
        rows, the only thing about other features its page shows (part of its input digest)."""
        run = key[0]
        linked = [(run, r["src_layer"], r["src_stream"], r["src_feature"]) for r in self.data.upstream.get(key, [])[:MAX_LINKED]]
        linked += [(run, r["dst_layer"], r["dst_stream"], r["dst_feature"]) for r in self.data.downstream.get(key, [])[:MAX_LINKED]]
        return "".join("1" if k in self.data.feature_set else "0" for k in linked)

    def feature(self, f: dict, examples_span: int = 12) -> dict:
        """Context of a feature page."""
        run_id, layer, stream, feat = f["run_id"], f["layer"], f["stream"], f["feature"]
        key = (run_id, layer, stream, feat)
        path = links.feature_page(*key)
        root = links.root_of(path)
        run = self.data.run_by_id[run_id]
        vmax = f["max_activation"] or 1.0
        stats = {s["step"]: s for s in self.data.steps.get(key, [])}
        by_step: dict[int, list[dict]] = defaultdict(list)
        for ex in self.data.examples.get(key, []):
            by_step[ex["step"]].append(ex)
        n_steps = run["n_steps"] or (max(stats, default=-1) + 1)
        steps = []
        for step in range(n_steps):
            st = stats.get(step)
            exs = [self._example(root, run, key, ex, vmax, examples_span) for ex in by_step.get(step, [])]
            sigma = st["sigma"] if st else (exs[0]["sigma"] if exs else None)
            steps.append({"step": step, "label": _step_label(step, sigma), "stats": st, "examples": exs,
                          "hist": svg.histogram(st["hist_counts"] or [], st["max_activation"],
                                                title=f"activation histogram, step {step}") if st else None})
        labels = [s["label"] for s in steps]
        charts = {
            "density": svg.step_chart(labels, {"density": [s["stats"]["density"] if s["stats"] else 0 for s in steps]},
                                      bars=True, title="density per step"),
            "activation": svg.step_chart(labels, {
                "mean": [s["stats"]["mean_activation"] if s["stats"] else None for s in steps],
                "max": [s["stats"]["max_activation"] if s["stats"] else None for s in steps]},
                title="activation per step"),
        }
        up = [{**self.feature_link(root, run_id, r["src_layer"], r["src_stream"], r["src_feature"]), **r}
              for r in self.data.upstream.get(key, [])[:MAX_LINKED]]
        down = [{**self.feature_link(root, run_id, r["dst_layer"], r["dst_stream"], r["dst_feature"]), **r}
                for r in self.data.downstream.get(key, [])[:MAX_LINKED]]
        graphs = [{**g, "href": root + links.graph_page(run_id, g["graph_id"])}
                  for g in self.data.feature_graphs.get(key, [])[:MAX_LINKED * 2]]
        prompts = [{**self.prompt_link(root, run_id, r["prompt_id"]), **r} for r in self.data.feature_prompts.get(key, [])]
        return {"path": path, "root": root, "title": links.feature_key(layer, stream, feat), "f": f, "run": run,
                "steps": steps, "charts": charts, "colorbar": svg.colorbar(vmax), "vmax": vmax,
                "upstream": up, "downstream": down, "graphs": graphs, "prompts": prompts,
                "list_href": root + links.feature_list_page(run_id, layer, stream)}

    def _example(self, root: str, run: dict, key: tuple, ex: dict, vmax: float, span: int) -> dict:
        run_id, layer, stream, feat = key
        pid, step = ex["prompt_id"], ex["step"]
        p = self.data.prompt_by_id.get((run_id, pid), {})
        cells = self.data.example_cells.get((run_id, layer, stream, feat, pid, step), [])
        out = {**ex, "prompt": self.prompt_link(root, run_id, pid)}
        if stream == "img":
            width, height = run["width"], run["height"]  # the token grid's geometry; the image is drawn to fit it
            href = self.image(root, p) if p else None
            out["crop"] = svg.crop_heatmap(href or "", width, height, run["patch_px"], cells, ex["position"], vmax,
                                           span=span)
        else:
            out["tokens"] = svg.shaded_tokens(self.data.tokens.get((run_id, pid), []), dict(cells), ex["position"], vmax)
        return out

    # --- prompt pages -------------------------------------------------------------------------
    def prompt(self, p: dict, prev: dict | None, nxt: dict | None) -> dict:
        """Context of a prompt (generation) page."""
        run_id, pid = p["run_id"], p["prompt_id"]
        path = links.prompt_page(run_id, pid)
        root = links.root_of(path)
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in self.data.prompt_features.get((run_id, pid), []):
            groups[(r["layer"], r["stream"])].append({**self.feature_link(root, run_id, r["layer"], r["stream"],
                                                                          r["feature"]), **r})
        features = [{"layer": k[0], "stream": k[1], "rows": v} for k, v in sorted(groups.items())]
        graphs = [{**g, "href": root + links.graph_page(run_id, g["graph_id"])}
                  for g in self.graphs_by_prompt.get((run_id, pid), [])]
        return {"path": path, "root": root, "title": f"prompt {pid}", "p": p, "run": self.data.run_by_id[run_id],
                "image": self.image(root, p), "tokens": self.data.tokens.get((run_id, pid), []),
                "features": features, "graphs": graphs, "has_graph_tables": self.data.has_graph_tables,
                "errors": self.errors.get((run_id, pid)), "errors_labelled": self.errors_labelled,
                "checked": (run_id, pid) in self.errors,
                "prev": root + links.prompt_page(run_id, prev["prompt_id"]) if prev else None,
                "next": root + links.prompt_page(run_id, nxt["prompt_id"]) if nxt else None,
                "analysis_href": root + links.analysis_page("error_explanations")}

    # --- graph pages --------------------------------------------------------------------------
    def graph(self, g: dict) -> dict:
        """Context of an attribution graph's page."""
        run_id, gid = g["run_id"], g["graph_id"]
        path = links.graph_page(run_id, gid)
        root = links.root_of(path)
        nodes = self.data.graph_nodes.get((gid,), [])
        edges = self.data.graph_edges.get((gid,), [])
        toks = self.data.tokens.get((run_id, g["prompt_id"]), [])

        def href(layer, stream, feature):
            return self.feature_link(root, run_id, layer, stream, feature)["href"]

        def token_of(stream, pos):
            return toks[pos] if stream == "txt" and pos is not None and 0 <= pos < len(toks) else None

        drawing = draw_graph(nodes, edges, href, token_of)
        by_node = {n["node"]: n for n in nodes}

        def describe(n):
            if n is None:
                return {"key": "?", "href": None, "label": None}
            if n["feature"] is not None and n["layer"] is not None:
                return self.feature_link(root, run_id, n["layer"], n["stream"], n["feature"])
            where = f" @{n['position']}" if n["position"] is not None else ""
            tok = token_of(n["stream"], n["position"])
            layer = f" L{n['layer']}" if n["layer"] is not None else ""
            return {"key": f"{n['node_type']}{layer} {n['stream'] or ''}{where}" + (f" {tok!r}" if tok else ""),
                    "href": None, "label": None}

        top_nodes = sorted(nodes, key=lambda n: -abs(n["influence"] or 0))[:30]
        top_edges = sorted(edges, key=lambda e: -abs(e["weight"]))[:30]
        scores = [(k, g[k]) for k in ("target_value", "bias_total", "conservation_error", "conservation_error_max",
                                      "reproduction_error", "replacement_score", "completeness_score",
                                      "pruned_replacement_score", "pruned_completeness_score", "kept_node_influence",
                                      "kept_edge_influence", "faithfulness_k", "faithfulness_spearman",
                                      "faithfulness_pearson")]
        return {"path": path, "root": root, "title": f"graph {gid}", "g": g, "drawing": drawing, "scores": scores,
                "prompt": self.prompt_link(root, run_id, g["prompt_id"]),
                "image": self.image(root, self.data.prompt_by_id.get((run_id, g["prompt_id"]), {})),
                "target": (self.feature_link(root, run_id, g["target_layer"], g["target_stream"], g["target_feature"])
                           if g["target_feature"] is not None and g["target_layer"] is not None else None),
                "nodes": [{**n, "d": describe(n)} for n in top_nodes],
                "edges": [{**e, "s": describe(by_node.get(e["source"])), "t": describe(by_node.get(e["target"]))}
                          for e in top_edges]}

    # --- index and lists ----------------------------------------------------------------------
    def index(self) -> dict:
        """Context of the index page."""
        root = ""
        runs = []
        counts: dict[tuple, int] = defaultdict(int)
        for f in self.data.features:
            counts[(f["run_id"], f["layer"], f["stream"])] += 1
        for r in self.data.runs:
            prov = []
            for field in ("versions_json", "model_json"):
                try:
                    d = json.loads(r[field] or "{}")
                except ValueError:
                    d = {}
                prov.append({k: v for k, v in d.items() if v is not None and not isinstance(v, (dict, list))})
            lists = [{"layer": k[1], "stream": k[2], "n": n, "href": links.feature_list_page(*k)}
                     for k, n in sorted(counts.items()) if k[0] == r["run_id"]]
            try:
                config = json.dumps(json.loads(r["config_json"] or "{}"), indent=2)
            except ValueError:
                config = r["config_json"] or ""
            runs.append({**r, "versions": prov[0], "model": prov[1], "config": config, "lists": lists,
                         "n_features": sum(x["n"] for x in lists)})
        notable = defaultdict(lambda: {"strongest": [], "frequent": []})
        for kind, rows in (("strongest", self.data.strongest), ("frequent", self.data.most_frequent)):
            for r in rows:
                notable[(r["run_id"], r["layer"], r["stream"])][kind].append(
                    {**self.feature_link(root, r["run_id"], r["layer"], r["stream"], r["feature"]), **r})
        in_graphs = sorted(((k, len(v)) for k, v in self.data.feature_graphs.items()), key=lambda kv: -kv[1])[:10]
        return {"path": "index.html", "root": root, "title": "circuit atlas report", "runs": runs,
                "fidelity": self._fidelity(), "set_fidelity": self.data.set_fidelity,
                "has_fidelity_tables": self.data.has_fidelity_tables,
                "notable": [{"run_id": k[0], "layer": k[1], "stream": k[2], **v} for k, v in sorted(notable.items())],
                "in_graphs": [{**self.feature_link(root, *k), "n": n} for k, n in in_graphs],
                "n_prompts": len(self.data.prompts), "n_graphs": len(self.data.graphs),
                "has_graph_tables": self.data.has_graph_tables, "analyses": self.analyses,
                "many_runs": len(self.data.runs) > 1}

    def _fidelity(self) -> dict | None:
        """Fidelity charts and a (layer, stream) x role table: the newest measurement of each."""
        rows = self.data.fidelity
        if not rows:
            return None
        newest: dict[tuple, dict] = {}
        for r in sorted(rows, key=lambda r: str(r["measured_at"]), reverse=True):
            newest.setdefault((r["layer"], r["stream"], r["role"]), r)
        layers = sorted({k[0] for k in newest})
        roles = [r for r in ("transcoder", "sae") if any(k[2] == r for k in newest)]
        fvu, l0 = {}, {}
        for stream in ("txt", "img"):
            for role in roles:
                vals = [newest.get((layer, stream, role)) for layer in layers]
                if any(vals):
                    fvu[f"{stream} {role}"] = [v["fvu"] if v else None for v in vals]
                    l0[f"{stream} {role}"] = [v["l0"] if v else None for v in vals]
        table = [{"layer": layer, "stream": stream, **{role: newest.get((layer, stream, role)) for role in roles}}
                 for layer in layers for stream in ("txt", "img")
                 if any((layer, stream, role) in newest for role in roles)]
        colours = {"txt transcoder": svg.STREAM_COLOURS["txt"], "txt sae": "#c9a6dd",
                   "img transcoder": svg.STREAM_COLOURS["img"], "img sae": "#f3cf86"}
        cats = [f"L{x}" for x in layers]
        return {"rows": rows, "roles": roles, "table": table,
                "fvu_chart": svg.grouped_bars(cats, fvu, colours, title="FVU per layer", ylabel="FVU (lower is better)"),
                "l0_chart": svg.grouped_bars(cats, l0, colours, title="L0 per layer",
                                             ylabel="L0 (features active per position)")}

    def feature_list(self, run_id: str, layer: int, stream: str) -> dict:
        """Context of the page listing every feature of one (run, layer, stream)."""
        path = links.feature_list_page(run_id, layer, stream)
        root = links.root_of(path)
        rows = [{**f, "href": self.feature_link(root, run_id, layer, stream, f["feature"])["href"]}
                for f in self.data.features if (f["run_id"], f["layer"], f["stream"]) == (run_id, layer, stream)]
        rows.sort(key=lambda f: (-(f["density"] or 0), f["feature"]))
        return {"path": path, "root": root, "title": f"features of layer {layer}, {stream} stream", "run_id": run_id,
                "layer": layer, "stream": stream, "rows": rows, "n_pages": sum(1 for r in rows if r["href"])}

    def prompt_list(self) -> dict:
        """Context of the page listing every generation."""
        root = links.root_of(links.PROMPT_LIST)
        return {"path": links.PROMPT_LIST, "root": root, "title": "prompts",
                "prompts": [{**p, "href": root + links.prompt_page(p["run_id"], p["prompt_id"]),
                             "img": self.thumb(root, p)} for p in self.data.prompts],
                "many_runs": len(self.data.runs) > 1}

    def graph_list(self) -> dict:
        """Context of the page listing every attribution graph."""
        root = links.root_of(links.GRAPH_LIST)
        return {"path": links.GRAPH_LIST, "root": root, "title": "attribution graphs",
                "has_graph_tables": self.data.has_graph_tables,
                "graphs": [{**g, "href": root + links.graph_page(g["run_id"], g["graph_id"]),
                            "prompt": self.prompt_link(root, g["run_id"], g["prompt_id"]),
                            "target": (self.feature_link(root, g["run_id"], g["target_layer"], g["target_stream"],
                                                         g["target_feature"])
                                       if g["target_feature"] is not None and g["target_layer"] is not None else None)}
                           for g in self.data.graphs]}

    def analysis(self, result) -> dict:
        """Context of an analysis page."""
        path = links.analysis_page(result.spec.name)
        return {"path": path, "root": links.root_of(path), "title": result.spec.title, "a": result,
                "has_graphs": bool(self.data.graphs)}
