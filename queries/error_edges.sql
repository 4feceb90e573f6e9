-- answers: Error explanations over edges: edges (source -> target, identified position-free by
-- node_key, e.g. input.txt:red -> L2.img.77; see prompt_graph_nodes) whose presence or strength
-- in the attribution graphs separates erroneous generations from correct ones (see
-- error_explanations for the groups and statistics). An edge's strength in a generation is its
-- attribution (sum of its position-level edges, signed, pre-activation units of the target
-- node) summed over the generation's graphs and divided by their number (0 where absent).
-- param: error_type VARCHAR = NULL | one error type (NULL: every error type found, each against the correct generations)
-- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
-- param: step INTEGER = NULL | only graphs of this denoising step (NULL: all)
-- param: target_spec VARCHAR = NULL | only graphs of this --target spec, so that comparable graphs are compared (NULL: all)
-- param: source VARCHAR = NULL | only labels from this source (oracle or labels:<file name>; NULL: all)
-- param: match VARCHAR = all | all: every correct generation is a control; same_text: only correct generations of a prompt text that has this error in another generation
-- param: node_types VARCHAR = feature,target,input | node types allowed at both ends (comma-separated from feature, target, input, error)
-- param: min_generations INTEGER = 2 | edges present in at least this many compared generations
-- param: k INTEGER = 30 | rows per error type, largest effects first (0: all)
-- columns: run_id, error_type, rank, source_key, target_key, cross_stream, n_error, n_correct, error_with, correct_with, error_presence, correct_presence, presence_diff, log_odds_ratio, mean_error, mean_correct, effect_size, error_prompt_ids, correct_prompt_ids
WITH labels AS (
    SELECT run_id, prompt_id, error_type
    FROM generation_errors
    WHERE (getvariable('run_id') IS NULL OR run_id = getvariable('run_id'))
      AND (getvariable('source') IS NULL OR source = getvariable('source'))
), g AS (
    SELECT graph_id, run_id, prompt_id
    FROM graphs
    WHERE status = 'ok'
      AND (getvariable('run_id') IS NULL OR run_id = getvariable('run_id'))
      AND (getvariable('step') IS NULL OR step = getvariable('step'))
      AND (getvariable('target_spec') IS NULL OR target_spec = getvariable('target_spec'))
), traced AS (
    SELECT run_id, prompt_id, count(*) AS n_graphs FROM g GROUP BY ALL
), err AS (
    SELECT DISTINCT l.run_id, l.error_type, l.prompt_id
    FROM labels l SEMI JOIN traced t USING (run_id, prompt_id)
    WHERE l.error_type <> 'none' AND (getvariable('error_type') IS NULL OR l.error_type = getvariable('error_type'))
), ok AS (
    SELECT l.run_id, l.prompt_id, any_value(p.text) AS text
    FROM labels l SEMI JOIN traced t USING (run_id, prompt_id)
    JOIN prompts p USING (run_id, prompt_id)
    GROUP BY ALL
    HAVING bool_and(l.error_type = 'none')
), err_text AS (
    SELECT DISTINCT e.run_id, e.error_type, p.text FROM err e JOIN prompts p USING (run_id, prompt_id)
), groups AS (
    SELECT run_id, error_type, prompt_id, true AS is_error FROM err
    UNION ALL
    SELECT t.run_id, t.error_type, o.prompt_id, false
    FROM (SELECT DISTINCT run_id, error_type FROM err) t
    JOIN ok o USING (run_id)
    WHERE coalesce(getvariable('match'), 'all') = 'all'
       OR EXISTS (SELECT 1 FROM err_text x WHERE x.run_id = o.run_id AND x.error_type = t.error_type AND x.text = o.text)
), sizes AS (
    SELECT run_id, error_type, count(*) FILTER (WHERE is_error) AS n_error,
           count(*) FILTER (WHERE NOT is_error) AS n_correct
    FROM groups GROUP BY ALL
), nodes AS (
    SELECT n.run_id, n.graph_id, n.node, n.stream, g.prompt_id,
           CASE WHEN n.node_type IN ('feature', 'target') AND n.feature IS NOT NULL
                     THEN 'L' || n.layer || '.' || n.stream || '.' || n.feature
                WHEN n.node_type = 'target' THEN 'output.' || n.stream
                WHEN n.node_type = 'error' THEN 'error.L' || n.layer || '.' || n.stream
                WHEN n.stream = 'txt' THEN 'input.txt:' || coalesce(replace(tok.token, '▁', ''), '<pad>')
                ELSE 'input.' || n.stream END AS node_key
    FROM graph_nodes n
    JOIN g USING (run_id, graph_id)
    SEMI JOIN groups gp ON gp.run_id = n.run_id AND gp.prompt_id = g.prompt_id
    LEFT JOIN prompt_tokens tok
           ON n.node_type = 'input' AND n.stream = 'txt' AND tok.run_id = n.run_id AND tok.prompt_id = g.prompt_id
          AND tok.position = n.position
    WHERE list_contains(string_split(replace(coalesce(getvariable('node_types'), 'feature,target,input'), ' ', ''), ','),
                        n.node_type)
), strength AS (
    SELECT e.run_id, s.prompt_id, s.node_key AS source_key, t.node_key AS target_key,
           bool_or(e.cross_stream) AS cross_stream, sum(e.weight) / any_value(tr.n_graphs) AS s
    FROM graph_edges e
    JOIN nodes s ON s.run_id = e.run_id AND s.graph_id = e.graph_id AND s.node = e.source
    JOIN nodes t ON t.run_id = e.run_id AND t.graph_id = e.graph_id AND t.node = e.target
    JOIN traced tr ON tr.run_id = e.run_id AND tr.prompt_id = s.prompt_id
    GROUP BY e.run_id, s.prompt_id, s.node_key, t.node_key
), stats AS (
    SELECT gr.run_id, gr.error_type, st.source_key, st.target_key, bool_or(st.cross_stream) AS cross_stream,
           count(*) FILTER (WHERE gr.is_error) AS error_with, count(*) FILTER (WHERE NOT gr.is_error) AS correct_with,
           coalesce(sum(st.s) FILTER (WHERE gr.is_error), 0) AS se,
           coalesce(sum(st.s * st.s) FILTER (WHERE gr.is_error), 0) AS sse,
           coalesce(sum(st.s) FILTER (WHERE NOT gr.is_error), 0) AS sc,
           coalesce(sum(st.s * st.s) FILTER (WHERE NOT gr.is_error), 0) AS ssc,
           list_slice(list(gr.prompt_id ORDER BY abs(st.s) DESC, gr.prompt_id) FILTER (WHERE gr.is_error), 1, 20) AS error_prompt_ids,
           list_slice(list(gr.prompt_id ORDER BY abs(st.s) DESC, gr.prompt_id) FILTER (WHERE NOT gr.is_error), 1, 20) AS correct_prompt_ids
    FROM groups gr
    JOIN strength st USING (run_id, prompt_id)
    GROUP BY gr.run_id, gr.error_type, st.source_key, st.target_key
    HAVING count(*) >= coalesce(getvariable('min_generations'), 2)
), scored AS (
    SELECT s.*, z.n_error, z.n_correct,
           s.error_with / z.n_error AS error_presence,
           s.correct_with / nullif(z.n_correct, 0) AS correct_presence,
           s.se / z.n_error AS mean_error,
           s.sc / nullif(z.n_correct, 0) AS mean_correct,
           ((s.sse - s.se * s.se / z.n_error) + coalesce(s.ssc - s.sc * s.sc / nullif(z.n_correct, 0), 0))
               / nullif(z.n_error + z.n_correct - 2, 0) AS pooled_var
    FROM stats s JOIN sizes z USING (run_id, error_type)
), final AS (
    SELECT *,
           error_presence - correct_presence AS presence_diff,
           ln((error_with + 0.5) / (n_error - error_with + 0.5))
               - ln((correct_with + 0.5) / (n_correct - correct_with + 0.5)) AS log_odds_ratio,
           CASE WHEN pooled_var > 1e-300 THEN (mean_error - mean_correct) / sqrt(pooled_var) END AS effect_size
    FROM scored
)
SELECT f.run_id, f.error_type,
       row_number() OVER (PARTITION BY f.run_id, f.error_type
                          ORDER BY abs(f.effect_size) DESC NULLS LAST, abs(f.presence_diff) DESC NULLS LAST,
                                   f.source_key, f.target_key) AS rank,
       f.source_key, f.target_key, f.cross_stream, f.n_error, f.n_correct, f.error_with, f.correct_with,
       f.error_presence, f.correct_presence, f.presence_diff, f.log_odds_ratio, f.mean_error, f.mean_correct,
       f.effect_size, f.error_prompt_ids, f.correct_prompt_ids
FROM final f
QUALIFY coalesce(getvariable('k'), 30) <= 0 OR rank <= coalesce(getvariable('k'), 30)
ORDER BY f.run_id, f.error_type, rank
