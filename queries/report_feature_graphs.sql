-- answers: The attribution graphs each feature appears in (as a node or as the target), with its
-- activation and influence on the graph's target there.
-- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
-- columns: run_id, layer, stream, feature, graph_id, prompt_id, step, node_type, activation, influence
SELECT n.run_id, n.layer, n.stream, n.feature, n.graph_id, g.prompt_id, g.step, n.node_type, n.activation,
       n.influence
FROM graph_nodes n
JOIN graphs g ON g.graph_id = n.graph_id
WHERE n.feature IS NOT NULL AND n.layer IS NOT NULL
  AND (getvariable('run_id') IS NULL OR n.run_id = getvariable('run_id'))
ORDER BY n.run_id, n.layer, n.stream, n.feature, n.influence DESC NULLS LAST, n.graph_id
