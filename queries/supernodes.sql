-- answers: Candidate supernodes (table supernodes, written by `atlas analyze`): groups of
-- features that play the same role across attribution graphs (connected components of the
-- supernode_candidates pairs: similar graph neighbourhoods), with their members, the graphs they
-- appear in and their labels. Formed without decoder directions.
-- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
-- param: min_members INTEGER = 2 | groups with at least this many features
-- columns: run_id, supernode_id, n_members, layers, stream, members, n_graphs, mean_similarity, labels, method
SELECT s.run_id, s.supernode_id, any_value(s.n_members) AS n_members, list(DISTINCT s.layer ORDER BY s.layer) AS layers,
       any_value(s.stream) AS stream,
       list('L' || s.layer || '.' || s.stream || '.' || s.feature ORDER BY s.n_graphs DESC, s.layer, s.feature) AS members,
       CAST(sum(s.n_graphs) AS BIGINT) AS n_graphs, avg(s.mean_similarity) AS mean_similarity,
       list(f.label ORDER BY s.n_graphs DESC) FILTER (WHERE f.label IS NOT NULL) AS labels, any_value(s.method) AS method
FROM supernodes s
LEFT JOIN features f USING (run_id, layer, stream, feature)
WHERE (getvariable('run_id') IS NULL OR s.run_id = getvariable('run_id'))
GROUP BY s.run_id, s.supernode_id
HAVING any_value(s.n_members) >= coalesce(getvariable('min_members'), 2)
ORDER BY s.run_id, s.supernode_id
