-- answers: Upstream and downstream neighbours of a feature aggregated over the attribution
-- graphs it appears in (as a node or as the target): the nodes with edges into it (upstream) or
-- out of it (downstream), identified position-free (node_key, see prompt_graph_nodes), with
-- the number of graphs and generations the edge occurs in and its mean and total attribution
-- (per graph: the sum of the position-level edges; pre-activation units of the edge's target).
-- param: layer INTEGER = 0 | double-stream layer of the feature
-- param: stream VARCHAR = img | img or txt
-- param: feature INTEGER = 0 | feature index
-- param: direction VARCHAR = both | upstream, downstream or both
-- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
-- param: step INTEGER = NULL | only graphs of this denoising step (NULL: all)
-- param: k INTEGER = 20 | neighbours per direction, most supported first (0: all)
-- columns: run_id, direction, rank, neighbor_key, neighbor_type, layer, stream, feature, n_graphs, anchor_graphs, n_prompts, mean_weight, total_weight, mean_abs_weight, prompt_ids, label
WITH g AS (
    SELECT graph_id, run_id, prompt_id, step
    FROM graphs
    WHERE status = 'ok'
      AND (getvariable('run_id') IS NULL OR run_id = getvariable('run_id'))
      AND (getvariable('step') IS NULL OR step = getvariable('step'))
), anchor AS (
    SELECT n.run_id, n.graph_id, n.node, g.prompt_id
    FROM graph_nodes n
    JOIN g USING (run_id, graph_id)
    WHERE n.layer = coalesce(getvariable('layer'), 0) AND n.stream = coalesce(getvariable('stream'), 'img')
      AND n.feature = coalesce(getvariable('feature'), 0) AND n.node_type IN ('feature', 'target')
), n_anchor AS (
    SELECT run_id, count(DISTINCT graph_id) AS anchor_graphs FROM anchor GROUP BY run_id
), touching AS (
    SELECT 'upstream' AS direction, e.run_id, e.graph_id, a.prompt_id, e.source AS other, e.weight
    FROM graph_edges e JOIN anchor a ON a.run_id = e.run_id AND a.graph_id = e.graph_id AND a.node = e.target
    WHERE coalesce(getvariable('direction'), 'both') IN ('upstream', 'both')
    UNION ALL
    SELECT 'downstream', e.run_id, e.graph_id, a.prompt_id, e.target, e.weight
    FROM graph_edges e JOIN anchor a ON a.run_id = e.run_id AND a.graph_id = e.graph_id AND a.node = e.source
    WHERE coalesce(getvariable('direction'), 'both') IN ('downstream', 'both')
), keyed AS (
    SELECT t.direction, t.run_id, t.graph_id, t.prompt_id, t.weight, n.node_type, n.layer, n.stream, n.feature,
           CASE WHEN n.node_type IN ('feature', 'target') AND n.feature IS NOT NULL
                     THEN 'L' || n.layer || '.' || n.stream || '.' || n.feature
                WHEN n.node_type = 'target' THEN 'output.' || n.stream
                WHEN n.node_type = 'error' THEN 'error.L' || n.layer || '.' || n.stream
                WHEN n.stream = 'txt' THEN 'input.txt:' || coalesce(replace(tok.token, '▁', ''), '<pad>')
                ELSE 'input.' || n.stream END AS neighbor_key
    FROM touching t
    JOIN graph_nodes n ON n.run_id = t.run_id AND n.graph_id = t.graph_id AND n.node = t.other
    LEFT JOIN prompt_tokens tok
           ON n.node_type = 'input' AND n.stream = 'txt' AND tok.run_id = n.run_id AND tok.prompt_id = t.prompt_id
          AND tok.position = n.position
), per_graph AS (
    SELECT direction, run_id, graph_id, any_value(prompt_id) AS prompt_id, neighbor_key,
           any_value(node_type) AS node_type, any_value(layer) AS layer, any_value(stream) AS stream,
           any_value(feature) AS feature, sum(weight) AS weight
    FROM keyed
    GROUP BY direction, run_id, graph_id, neighbor_key
), agg AS (
    SELECT direction, run_id, neighbor_key, any_value(node_type) AS neighbor_type, any_value(layer) AS layer,
           any_value(stream) AS stream, any_value(feature) AS feature, count(*) AS n_graphs,
           count(DISTINCT prompt_id) AS n_prompts, avg(weight) AS mean_weight, sum(weight) AS total_weight,
           avg(abs(weight)) AS mean_abs_weight, list(DISTINCT prompt_id ORDER BY prompt_id) AS prompt_ids
    FROM per_graph
    GROUP BY direction, run_id, neighbor_key
)
SELECT a.run_id, a.direction,
       row_number() OVER (PARTITION BY a.run_id, a.direction
                          ORDER BY a.n_graphs DESC, a.mean_abs_weight DESC, a.neighbor_key) AS rank,
       a.neighbor_key, a.neighbor_type,
       CASE WHEN a.neighbor_type IN ('input') THEN NULL ELSE a.layer END AS layer, a.stream,
       a.feature, a.n_graphs, na.anchor_graphs, a.n_prompts, a.mean_weight, a.total_weight, a.mean_abs_weight,
       a.prompt_ids, f.label
FROM agg a
JOIN n_anchor na USING (run_id)
LEFT JOIN features f ON a.feature IS NOT NULL AND f.run_id = a.run_id AND f.layer = a.layer AND f.stream = a.stream
                    AND f.feature = a.feature
QUALIFY coalesce(getvariable('k'), 20) <= 0 OR rank <= coalesce(getvariable('k'), 20)
ORDER BY a.run_id, a.direction DESC, rank
