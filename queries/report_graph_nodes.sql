-- answers: The nodes of every committed (pruned) attribution graph: type, layer, stream,
-- position, feature, activation and influence on the target.
-- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
-- columns: run_id, graph_id, node, node_type, layer, stream, position, feature, activation, influence, cumulative_influence
SELECT n.run_id, n.graph_id, n.node, n.node_type, n.layer, n.stream, n.position, n.feature, n.activation,
       n.influence, n.cumulative_influence
FROM graph_nodes n
SEMI JOIN graphs g ON g.graph_id = n.graph_id
WHERE getvariable('run_id') IS NULL OR n.run_id = getvariable('run_id')
ORDER BY n.run_id, n.graph_id, n.node
