-- answers: Recurring circuits: two-step paths source -> via -> target (a feature feeding a
-- feature that feeds the graph's target, across layers and streams) that recur across the
-- attribution graphs of many prompts, seeds and denoising steps. Nodes are identified
-- position-free (node_key, see prompt_graph_nodes). A path's attribution in one graph is
-- w(source->via) * w(via->target) / activation(via): the share of the via node's
-- pre-activation that the source supplies times the via node's direct effect on the target
-- (target pre-activation units), summed over the graph's position-level paths with those keys.
-- mean_source_edge / mean_target_edge: mean over graphs of the summed source->via / via->target
-- edges (each position-level edge once).
-- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
-- param: step INTEGER = NULL | only graphs of this denoising step (NULL: all)
-- param: prompt_ids VARCHAR = NULL | comma-separated generations (prompts.prompt_id) to aggregate over (NULL: all)
-- param: source_types VARCHAR = feature | node types allowed as the path's source (comma-separated: feature, input, error)
-- param: min_support INTEGER = 2 | paths in at least this many graphs
-- param: k INTEGER = 50 | rows returned, most supported first (0: all)
-- columns: run_id, source_key, via_key, target_key, streams, cross_stream, n_graphs, n_prompts, n_texts, n_seeds, steps, mean_attribution, total_attribution, mean_source_edge, mean_target_edge, prompt_ids
WITH g AS (
    SELECT gr.graph_id, gr.run_id, gr.prompt_id, gr.seed, gr.step, p.text
    FROM graphs gr
    JOIN prompts p USING (run_id, prompt_id)
    WHERE gr.status = 'ok'
      AND (getvariable('run_id') IS NULL OR gr.run_id = getvariable('run_id'))
      AND (getvariable('step') IS NULL OR gr.step = getvariable('step'))
      AND (getvariable('prompt_ids') IS NULL
           OR list_contains(string_split(replace(getvariable('prompt_ids'), ' ', ''), ','), CAST(gr.prompt_id AS VARCHAR)))
), nodes AS (
    SELECT n.run_id, n.graph_id, n.node, n.node_type, n.stream, n.activation,
           CASE WHEN n.node_type IN ('feature', 'target') AND n.feature IS NOT NULL
                     THEN 'L' || n.layer || '.' || n.stream || '.' || n.feature
                WHEN n.node_type = 'target' THEN 'output.' || n.stream
                WHEN n.node_type = 'error' THEN 'error.L' || n.layer || '.' || n.stream
                WHEN n.stream = 'txt' THEN 'input.txt:' || coalesce(replace(tok.token, '▁', ''), '<pad>')
                ELSE 'input.' || n.stream END AS node_key
    FROM graph_nodes n
    JOIN g USING (run_id, graph_id)
    LEFT JOIN prompt_tokens tok
           ON n.node_type = 'input' AND n.stream = 'txt' AND tok.run_id = n.run_id AND tok.prompt_id = g.prompt_id
          AND tok.position = n.position
), last_hop AS (   -- via -> target edges: via is a feature, target the graph's target node
    SELECT e.run_id, e.graph_id, e.source AS via, e.weight AS w2, v.node_key AS via_key, v.stream AS via_stream,
           v.activation AS via_activation, t.node_key AS target_key, t.stream AS target_stream
    FROM graph_edges e
    JOIN nodes t ON t.run_id = e.run_id AND t.graph_id = e.graph_id AND t.node = e.target AND t.node_type = 'target'
    JOIN nodes v ON v.run_id = e.run_id AND v.graph_id = e.graph_id AND v.node = e.source AND v.node_type = 'feature'
), paths AS (
    SELECT h.run_id, h.graph_id, s.node_key AS source_key, h.via_key, h.target_key,
           s.stream || '>' || h.via_stream || '>' || h.target_stream AS streams,
           e.weight * h.w2 / nullif(h.via_activation, 0) AS attribution, e.weight AS w1, h.w2,
           row_number() OVER (PARTITION BY h.run_id, h.graph_id, s.node_key, h.via ORDER BY e.source) AS via_rank
    FROM last_hop h
    JOIN graph_edges e ON e.run_id = h.run_id AND e.graph_id = h.graph_id AND e.target = h.via
    JOIN nodes s ON s.run_id = e.run_id AND s.graph_id = e.graph_id AND s.node = e.source
    WHERE list_contains(string_split(replace(coalesce(getvariable('source_types'), 'feature'), ' ', ''), ','), s.node_type)
), per_graph AS (
    SELECT run_id, graph_id, source_key, via_key, target_key, any_value(streams) AS streams,
           sum(attribution) AS attribution, sum(w1) AS w1, sum(w2) FILTER (WHERE via_rank = 1) AS w2
    FROM paths
    GROUP BY run_id, graph_id, source_key, via_key, target_key
), top AS (   -- rank on cheap aggregates first; the distinct counts and lists below are computed for the top k only
    SELECT run_id, source_key, via_key, target_key, any_value(streams) AS streams, count(*) AS n_graphs,
           avg(attribution) AS mean_attribution, sum(attribution) AS total_attribution,
           avg(w1) AS mean_source_edge, avg(w2) AS mean_target_edge
    FROM per_graph
    GROUP BY run_id, source_key, via_key, target_key
    HAVING count(*) >= coalesce(getvariable('min_support'), 2)
    ORDER BY n_graphs DESC, abs(mean_attribution) DESC NULLS LAST, source_key, via_key, target_key
    LIMIT (SELECT CASE WHEN coalesce(getvariable('k'), 50) <= 0 THEN NULL ELSE coalesce(getvariable('k'), 50) END)
), evidence AS (
    SELECT pg.run_id, pg.source_key, pg.via_key, pg.target_key, count(DISTINCT g.prompt_id) AS n_prompts,
           count(DISTINCT g.text) AS n_texts, count(DISTINCT g.seed) AS n_seeds,
           list(DISTINCT g.step ORDER BY g.step) AS steps, list(DISTINCT g.prompt_id ORDER BY g.prompt_id) AS prompt_ids
    FROM per_graph pg
    SEMI JOIN top USING (run_id, source_key, via_key, target_key)
    JOIN g USING (run_id, graph_id)
    GROUP BY pg.run_id, pg.source_key, pg.via_key, pg.target_key
)
SELECT t.run_id, t.source_key, t.via_key, t.target_key, t.streams,
       t.streams NOT IN ('img>img>img', 'txt>txt>txt') AS cross_stream, t.n_graphs, ev.n_prompts, ev.n_texts,
       ev.n_seeds, ev.steps, t.mean_attribution, t.total_attribution, t.mean_source_edge, t.mean_target_edge,
       ev.prompt_ids
FROM top t
JOIN evidence ev USING (run_id, source_key, via_key, target_key)
ORDER BY t.n_graphs DESC, abs(t.mean_attribution) DESC NULLS LAST, t.source_key, t.via_key, t.target_key
