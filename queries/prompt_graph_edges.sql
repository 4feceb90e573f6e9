-- answers: The edges of one attribution graph (graph_id), or of every graph of one generation
-- (run_id, prompt_id, optionally one denoising step): signed direct effect (attribution, in
-- pre-activation units of the target node) from source node to target node, with both nodes'
-- position-free keys (see prompt_graph_nodes) and positions.
-- param: graph_id VARCHAR = NULL | one graph (NULL: the graphs of run_id/prompt_id/step)
-- param: run_id VARCHAR = NULL | the generation's run (NULL: all runs)
-- param: prompt_id INTEGER = 0 | the generation (prompts.prompt_id); ignored when graph_id is given
-- param: step INTEGER = NULL | only graphs of this denoising step (NULL: all)
-- columns: run_id, graph_id, prompt_id, step, source, target, source_key, target_key, source_type, target_type, source_stream, target_stream, source_position, target_position, weight, cross_stream
WITH g AS (
    SELECT graph_id, run_id, prompt_id, step
    FROM graphs
    WHERE status = 'ok'
      AND (CASE WHEN getvariable('graph_id') IS NOT NULL THEN graph_id = getvariable('graph_id')
                ELSE prompt_id = coalesce(getvariable('prompt_id'), 0)
                     AND (getvariable('run_id') IS NULL OR run_id = getvariable('run_id'))
                     AND (getvariable('step') IS NULL OR step = getvariable('step')) END)
), nodes AS (
    SELECT n.run_id, n.graph_id, n.node, n.node_type, n.stream, n.position,
           CASE WHEN n.node_type IN ('feature', 'target') AND n.feature IS NOT NULL
                     THEN 'L' || n.layer || '.' || n.stream || '.' || n.feature
                WHEN n.node_type = 'target' THEN 'output.' || n.stream
                WHEN n.node_type = 'error' THEN 'error.L' || n.layer || '.' || n.stream
                WHEN n.stream = 'txt' THEN 'input.txt:' || coalesce(replace(tok.token, '▁', ''), '<pad>')
                ELSE 'input.' || n.stream END AS node_key
    FROM graph_nodes n
    JOIN g USING (run_id, graph_id)
    LEFT JOIN prompt_tokens tok
           ON n.stream = 'txt' AND tok.run_id = n.run_id AND tok.prompt_id = g.prompt_id AND tok.position = n.position
)
SELECT e.run_id, e.graph_id, g.prompt_id, g.step, e.source, e.target, s.node_key AS source_key, t.node_key AS target_key,
       e.source_type, e.target_type, e.source_stream, e.target_stream, s.position AS source_position,
       t.position AS target_position, e.weight, e.cross_stream
FROM graph_edges e
JOIN g USING (run_id, graph_id)
JOIN nodes s ON s.run_id = e.run_id AND s.graph_id = e.graph_id AND s.node = e.source
JOIN nodes t ON t.run_id = e.run_id AND t.graph_id = e.graph_id AND t.node = e.target
ORDER BY e.run_id, g.step, e.graph_id, e.target, e.source
