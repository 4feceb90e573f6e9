-- answers: Candidate supernodes, as pairs of features that play the same role across
-- attribution graphs: same stream (and layer, by default), similar graph neighbourhoods and
-- how often they co-occur. A feature's role vector holds, for every neighbour node_key (see
-- prompt_graph_nodes) upstream and downstream, its total attribution to or from that neighbour
-- over all graphs (image-patch inputs and error nodes left out: every image feature has them;
-- only its max_dims strongest neighbours kept); role_similarity is the cosine of two role
-- vectors. cooccurrence is the Jaccard index of the sets of graphs the two features appear in.
-- No decoder directions are used (the query stage is torch-free). `atlas analyze` groups the
-- pairs into supernodes (table supernodes).
-- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
-- param: step INTEGER = NULL | only graphs of this denoising step (NULL: all)
-- param: min_support INTEGER = 2 | features in at least this many graphs
-- param: max_features INTEGER = 500 | only the most recurring features of each run (by graphs), bounds the pair count
-- param: max_dims INTEGER = 64 | role vectors keep each feature's strongest neighbours only (bounds the cost; the cosine is over these)
-- param: min_similarity DOUBLE = 0.8 | pairs with role_similarity at least this
-- param: min_shared_dims INTEGER = 2 | pairs whose role vectors share at least this many neighbours (one shared neighbour always gives similarity 1)
-- param: same_layer BOOLEAN = true | only pairs within one layer (false: any layers of the stream)
-- param: k INTEGER = 200 | rows returned, most similar first (0: all)
-- columns: run_id, feature_key, other_key, layer, stream, feature, other_layer, other_feature, role_similarity, cooccurrence, shared_graphs, n_graphs, other_graphs, shared_dims
WITH g AS (
    SELECT graph_id, run_id, prompt_id
    FROM graphs
    WHERE status = 'ok'
      AND (getvariable('run_id') IS NULL OR run_id = getvariable('run_id'))
      AND (getvariable('step') IS NULL OR step = getvariable('step'))
), feat AS (   -- features of the graphs (feature nodes and feature targets)
    SELECT n.run_id, n.graph_id, n.node, n.layer, n.stream, n.feature
    FROM graph_nodes n JOIN g USING (run_id, graph_id)
    WHERE n.node_type IN ('feature', 'target') AND n.feature IS NOT NULL
), support AS (
    SELECT run_id, layer, stream, feature, count(DISTINCT graph_id) AS n_graphs
    FROM feat
    GROUP BY run_id, layer, stream, feature
    HAVING count(DISTINCT graph_id) >= coalesce(getvariable('min_support'), 2)
    QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY n_graphs DESC, layer, stream, feature)
            <= coalesce(getvariable('max_features'), 500)
), chosen AS (
    SELECT f.* FROM feat f SEMI JOIN support s USING (run_id, layer, stream, feature)
), keyed AS (
    SELECT n.run_id, n.graph_id, n.node,
           CASE WHEN n.node_type IN ('feature', 'target') AND n.feature IS NOT NULL
                     THEN 'L' || n.layer || '.' || n.stream || '.' || n.feature
                WHEN n.node_type = 'target' THEN 'output.' || n.stream
                WHEN n.node_type = 'error' THEN 'error'
                WHEN n.stream = 'txt' THEN 'input.txt:' || coalesce(replace(tok.token, '▁', ''), '<pad>')
                ELSE 'input.' || n.stream END AS node_key
    FROM graph_nodes n
    JOIN g USING (run_id, graph_id)
    LEFT JOIN prompt_tokens tok
           ON n.node_type = 'input' AND n.stream = 'txt' AND tok.run_id = n.run_id AND tok.prompt_id = g.prompt_id
          AND tok.position = n.position
), role AS (
    SELECT run_id, layer, stream, feature, dim, sum(weight) AS w
    FROM (
        SELECT c.run_id, c.layer, c.stream, c.feature, 'up:' || k.node_key AS dim, e.weight
        FROM graph_edges e
        JOIN chosen c ON c.run_id = e.run_id AND c.graph_id = e.graph_id AND c.node = e.target
        JOIN keyed k ON k.run_id = e.run_id AND k.graph_id = e.graph_id AND k.node = e.source
        UNION ALL
        SELECT c.run_id, c.layer, c.stream, c.feature, 'down:' || k.node_key, e.weight
        FROM graph_edges e
        JOIN chosen c ON c.run_id = e.run_id AND c.graph_id = e.graph_id AND c.node = e.source
        JOIN keyed k ON k.run_id = e.run_id AND k.graph_id = e.graph_id AND k.node = e.target
    )
    WHERE dim NOT IN ('up:input.img', 'up:error')
    GROUP BY run_id, layer, stream, feature, dim
    QUALIFY row_number() OVER (PARTITION BY run_id, layer, stream, feature ORDER BY abs(sum(weight)) DESC, dim)
            <= coalesce(getvariable('max_dims'), 64)
), norms AS (
    SELECT run_id, layer, stream, feature, sqrt(sum(w * w)) AS norm FROM role GROUP BY ALL
), dots AS (
    SELECT a.run_id, a.stream, a.layer, a.feature, b.layer AS other_layer, b.feature AS other_feature,
           sum(a.w * b.w) AS dot, count(*) AS shared_dims
    FROM role a
    JOIN role b ON a.run_id = b.run_id AND a.stream = b.stream AND a.dim = b.dim
               AND (a.layer < b.layer OR (a.layer = b.layer AND a.feature < b.feature))
               AND (a.layer = b.layer OR NOT coalesce(getvariable('same_layer'), true))
    GROUP BY ALL
), sims AS (
    SELECT d.*, d.dot / nullif(na.norm * nb.norm, 0) AS role_similarity
    FROM dots d
    JOIN norms na ON na.run_id = d.run_id AND na.layer = d.layer AND na.stream = d.stream AND na.feature = d.feature
    JOIN norms nb ON nb.run_id = d.run_id AND nb.layer = d.other_layer AND nb.stream = d.stream
                 AND nb.feature = d.other_feature
    WHERE d.dot / nullif(na.norm * nb.norm, 0) >= coalesce(getvariable('min_similarity'), 0.8)
      AND d.shared_dims >= coalesce(getvariable('min_shared_dims'), 2)
), graphs_of AS (
    SELECT DISTINCT run_id, layer, stream, feature, graph_id FROM chosen
), shared AS (
    SELECT s.run_id, s.stream, s.layer, s.feature, s.other_layer, s.other_feature, count(b.graph_id) AS shared_graphs
    FROM sims s
    JOIN graphs_of a ON a.run_id = s.run_id AND a.layer = s.layer AND a.stream = s.stream AND a.feature = s.feature
    LEFT JOIN graphs_of b ON b.run_id = s.run_id AND b.layer = s.other_layer AND b.stream = s.stream
                         AND b.feature = s.other_feature AND b.graph_id = a.graph_id
    GROUP BY ALL
)
SELECT s.run_id, 'L' || s.layer || '.' || s.stream || '.' || s.feature AS feature_key,
       'L' || s.other_layer || '.' || s.stream || '.' || s.other_feature AS other_key,
       s.layer, s.stream, s.feature, s.other_layer, s.other_feature, s.role_similarity,
       sh.shared_graphs / (sa.n_graphs + sb.n_graphs - sh.shared_graphs) AS cooccurrence,
       sh.shared_graphs, sa.n_graphs, sb.n_graphs AS other_graphs, s.shared_dims
FROM sims s
JOIN shared sh USING (run_id, stream, layer, feature, other_layer, other_feature)
JOIN support sa ON sa.run_id = s.run_id AND sa.layer = s.layer AND sa.stream = s.stream AND sa.feature = s.feature
JOIN support sb ON sb.run_id = s.run_id AND sb.layer = s.other_layer AND sb.stream = s.stream
               AND sb.feature = s.other_feature
ORDER BY s.role_similarity DESC, cooccurrence DESC, s.run_id, s.layer, s.feature, s.other_layer, s.other_feature
LIMIT (SELECT CASE WHEN coalesce(getvariable('k'), 200) <= 0 THEN NULL ELSE coalesce(getvariable('k'), 200) END)
