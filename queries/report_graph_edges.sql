-- answers: The edges of every committed (pruned) attribution graph: signed attribution from
-- source node to target node, and whether it crosses streams.
-- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
-- columns: run_id, graph_id, source, target, weight, cross_stream
SELECT e.run_id, e.graph_id, e.source, e.target, e.weight, e.cross_stream
FROM graph_edges e
SEMI JOIN graphs g ON g.graph_id = e.graph_id
WHERE getvariable('run_id') IS NULL OR e.run_id = getvariable('run_id')
ORDER BY e.run_id, e.graph_id, e.target, e.source
