-- answers: Edges that recur across attribution graphs (prompts, seeds, denoising steps): node
-- pairs identified position-free by their node_key (L3.img.644, input.txt:red, ...; see
-- prompt_graph_nodes), with support (graphs containing the edge), the generations, prompt texts,
-- seeds and steps it occurs in, and its mean and total attribution. An edge's attribution in one
-- graph is the sum of its position-level edges there (pre-activation units of the target node).
-- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
-- param: step INTEGER = NULL | only graphs of this denoising step (NULL: all)
-- param: prompt_ids VARCHAR = NULL | comma-separated generations (prompts.prompt_id) to aggregate over (NULL: all)
-- param: node_types VARCHAR = feature,target | node types allowed at both ends (comma-separated from feature, target, input, error; 'all')
-- param: cross_stream BOOLEAN = NULL | true: only txt<->img edges; false: only same-stream (NULL: both)
-- param: min_support INTEGER = 2 | edges in at least this many graphs
-- param: k INTEGER = 100 | rows returned, most supported first (0: all)
-- columns: run_id, source_key, target_key, source_type, target_type, source_stream, target_stream, n_graphs, n_prompts, n_texts, n_seeds, steps, mean_weight, total_weight, mean_abs_weight, prompt_ids
WITH g AS (
    SELECT gr.graph_id, gr.run_id, gr.prompt_id, gr.seed, gr.step, p.text
    FROM graphs gr
    JOIN prompts p USING (run_id, prompt_id)
    WHERE gr.status = 'ok'
      AND (getvariable('run_id') IS NULL OR gr.run_id = getvariable('run_id'))
      AND (getvariable('step') IS NULL OR gr.step = getvariable('step'))
      AND (getvariable('prompt_ids') IS NULL
           OR list_contains(string_split(replace(getvariable('prompt_ids'), ' ', ''), ','), CAST(gr.prompt_id AS VARCHAR)))
), types AS (
    SELECT unnest(CASE WHEN coalesce(getvariable('node_types'), 'feature,target') = 'all'
                       THEN ['feature', 'target', 'input', 'error']
                       ELSE string_split(replace(coalesce(getvariable('node_types'), 'feature,target'), ' ', ''), ',') END) AS t
), nodes AS (
    SELECT n.run_id, n.graph_id, n.node, n.node_type, n.stream,
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
    WHERE n.node_type IN (SELECT t FROM types)
), per_graph AS (
    SELECT e.run_id, e.graph_id, s.node_key AS source_key, t.node_key AS target_key,
           any_value(s.node_type) AS source_type, any_value(t.node_type) AS target_type,
           any_value(s.stream) AS source_stream, any_value(t.stream) AS target_stream, sum(e.weight) AS weight
    FROM graph_edges e
    JOIN nodes s ON s.run_id = e.run_id AND s.graph_id = e.graph_id AND s.node = e.source
    JOIN nodes t ON t.run_id = e.run_id AND t.graph_id = e.graph_id AND t.node = e.target
    WHERE getvariable('cross_stream') IS NULL OR e.cross_stream = getvariable('cross_stream')
    GROUP BY e.run_id, e.graph_id, s.node_key, t.node_key
), top AS (   -- rank on cheap aggregates first; the distinct counts and lists below are computed for the top k only
    SELECT run_id, source_key, target_key, any_value(source_type) AS source_type, any_value(target_type) AS target_type,
           any_value(source_stream) AS source_stream, any_value(target_stream) AS target_stream, count(*) AS n_graphs,
           avg(weight) AS mean_weight, sum(weight) AS total_weight, avg(abs(weight)) AS mean_abs_weight
    FROM per_graph
    GROUP BY run_id, source_key, target_key
    HAVING count(*) >= coalesce(getvariable('min_support'), 2)
    ORDER BY n_graphs DESC, mean_abs_weight DESC, source_key, target_key
    LIMIT (SELECT CASE WHEN coalesce(getvariable('k'), 100) <= 0 THEN NULL ELSE coalesce(getvariable('k'), 100) END)
), evidence AS (
    SELECT pg.run_id, pg.source_key, pg.target_key, count(DISTINCT g.prompt_id) AS n_prompts,
           count(DISTINCT g.text) AS n_texts, count(DISTINCT g.seed) AS n_seeds,
           list(DISTINCT g.step ORDER BY g.step) AS steps, list(DISTINCT g.prompt_id ORDER BY g.prompt_id) AS prompt_ids
    FROM per_graph pg
    SEMI JOIN top USING (run_id, source_key, target_key)
    JOIN g USING (run_id, graph_id)
    GROUP BY pg.run_id, pg.source_key, pg.target_key
)
SELECT t.run_id, t.source_key, t.target_key, t.source_type, t.target_type, t.source_stream, t.target_stream, t.n_graphs,
       ev.n_prompts, ev.n_texts, ev.n_seeds, ev.steps, t.mean_weight, t.total_weight, t.mean_abs_weight, ev.prompt_ids
FROM top t
JOIN evidence ev USING (run_id, source_key, target_key)
ORDER BY t.n_graphs DESC, t.mean_abs_weight DESC, t.source_key, t.target_key
