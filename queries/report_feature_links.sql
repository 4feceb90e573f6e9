-- answers: Feature-to-feature edges of the attribution graphs, summed over graphs: for each
-- (upstream feature, downstream feature) pair, in how many graphs the edge was kept, its total
-- and strongest signed attribution. A feature page's upstream and downstream features.
-- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
-- columns: run_id, src_layer, src_stream, src_feature, dst_layer, dst_stream, dst_feature, n_graphs, total_weight, max_abs_weight
WITH nodes AS (
    SELECT n.graph_id, n.node, n.layer, n.stream, n.feature
    FROM graph_nodes n
    SEMI JOIN graphs g ON g.graph_id = n.graph_id
    WHERE n.feature IS NOT NULL AND n.layer IS NOT NULL
      AND (getvariable('run_id') IS NULL OR n.run_id = getvariable('run_id'))
)
SELECT e.run_id, s.layer AS src_layer, s.stream AS src_stream, s.feature AS src_feature,
       d.layer AS dst_layer, d.stream AS dst_stream, d.feature AS dst_feature,
       count(DISTINCT e.graph_id) AS n_graphs, sum(e.weight) AS total_weight, max(abs(e.weight)) AS max_abs_weight
FROM graph_edges e
JOIN nodes s ON s.graph_id = e.graph_id AND s.node = e.source
JOIN nodes d ON d.graph_id = e.graph_id AND d.node = e.target
GROUP BY ALL
ORDER BY e.run_id, src_layer, src_stream, src_feature, max_abs_weight DESC
