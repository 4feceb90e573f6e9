"""Attribution graphs: Local Replacement Model, batched attribution, pruning, storage and export.

Modules (each importable on its own; ``export`` needs no torch):

- ``lrm``: :class:`LocalReplacementModel` (record one step, frozen norms/patterns/modulation,
  transcoders + constant errors), :func:`capture_step_inputs`, :func:`reproduction_error`;
- ``targets``: :class:`FeatureTarget`, :class:`OutputTarget`, :func:`parse_target_spec`
  (top-N, feature lists, regions and colour directions);
- ``attribute``: :class:`AttributionContext` (batched adjacency rows, bias terms, row cache),
  :func:`build_graph` (budgeted expansion), :class:`AttributionGraph`;
- ``prune``: node influence ``B = (I - A_norm)^-1 - I``, :func:`prune_graph`, :func:`graph_scores`;
- ``faithfulness``: ablations in the original model vs the graph's predictions;
- ``trace``: :func:`run_trace` (``atlas trace``: corpus runner writing the graph tables);
- ``export``: :func:`export_graph` (``atlas export-graph``: circuit-tracer and DifFRACT v2 JSON).
"""

_LAZY = {
    "LocalReplacementModel": "lrm", "capture_step_inputs": "lrm", "reproduction_error": "lrm",
    "FeatureTarget": "targets", "OutputTarget": "targets", "parse_target_spec": "targets",
    "AttributionContext": "attribute", "AttributionGraph": "attribute", "build_graph": "attribute",
    "prune_graph": "prune", "graph_scores": "prune", "node_influence": "prune",
    "run_trace": "trace", "TraceConfig": "trace", "export_graph": "export",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"atlas.attribution.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'atlas.attribution' has no attribute {name!r}")
