-- answers: The nodes of one attribution graph (graph_id), or of every graph of one generation
-- (run_id, prompt_id, optionally one denoising step): type, layer, stream, position (with the
-- text token), feature, activation and influence on the graph's target, and a position-free
-- node_key shared across graphs (L3.img.644 for a feature or feature target, input.txt:red for
-- a text token's embedding, input.img, error.L2.img, output.img).
-- param: graph_id VARCHAR = NULL | one graph (NULL: the graphs of run_id/prompt_id/step)
-- param: run_id VARCHAR = NULL | the generation's run (NULL: all runs)
-- param: prompt_id INTEGER = 0 | the generation (prompts.prompt_id); ignored when graph_id is given
-- param: step INTEGER = NULL | only graphs of this denoising step (NULL: all)
-- columns: run_id, graph_id, prompt_id, step, target_key, node, node_key, node_type, layer, stream, position, token, feature, activation, influence, label
WITH g AS (
    SELECT graph_id, run_id, prompt_id, step, target_key
    FROM graphs
    WHERE status = 'ok'
      AND (CASE WHEN getvariable('graph_id') IS NOT NULL THEN graph_id = getvariable('graph_id')
                ELSE prompt_id = coalesce(getvariable('prompt_id'), 0)
                     AND (getvariable('run_id') IS NULL OR run_id = getvariable('run_id'))
                     AND (getvariable('step') IS NULL OR step = getvariable('step')) END)
)
SELECT n.run_id, n.graph_id, g.prompt_id, g.step, g.target_key, n.node,
       CASE WHEN n.node_type IN ('feature', 'target') AND n.feature IS NOT NULL
                 THEN 'L' || n.layer || '.' || n.stream || '.' || n.feature
            WHEN n.node_type = 'target' THEN 'output.' || n.stream
            WHEN n.node_type = 'error' THEN 'error.L' || n.layer || '.' || n.stream
            WHEN n.stream = 'txt' THEN 'input.txt:' || coalesce(replace(tok.token, '▁', ''), '<pad>')
            ELSE 'input.' || n.stream END AS node_key,
       n.node_type, n.layer, n.stream, n.position, tok.token, n.feature, n.activation, n.influence, f.label
FROM graph_nodes n
JOIN g USING (run_id, graph_id)
LEFT JOIN prompt_tokens tok
       ON n.stream = 'txt' AND tok.run_id = n.run_id AND tok.prompt_id = g.prompt_id AND tok.position = n.position
LEFT JOIN features f
       ON n.feature IS NOT NULL AND f.run_id = n.run_id AND f.layer = n.layer AND f.stream = n.stream AND f.feature = n.feature
ORDER BY n.run_id, g.step, n.graph_id, n.node
