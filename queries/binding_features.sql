-- answers: Which features, layers and denoising steps carry attribute binding across the corpus:
-- the attribution from attribute words' text positions (binding_pairs; see attribute_binding)
-- into image-stream nodes on the attribute's own object's patches (own) and on the other
-- object's patches (other, i.e. leakage), grouped by the receiving image feature (or, with
-- side = sender, by the text feature at the attribute word that sends it), by layer, or by
-- step. With error_type set, only generations with that error (e.g. colour_leakage) count, so
-- the rows read "colour leakage goes through these features". Each distinct LRM edge of a
-- generation and step counts once; attribution sums |weight| (pre-activation units).
-- param: group_by VARCHAR = feature | feature, layer or step
-- param: side VARCHAR = receiver | receiver (image node the attribution lands on) or sender (text node at the attribute word; layer NULL = its embedding input)
-- param: order_by VARCHAR = own | own (binding carriers), other (leakage carriers) or total
-- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
-- param: step INTEGER = NULL | only graphs of this denoising step (NULL: all)
-- param: target_spec VARCHAR = NULL | only graphs of this --target spec (NULL: all)
-- param: region VARCHAR = auto | auto (ground truth where object_regions has it, else noun features), ground_truth or noun_features
-- param: noun_features INTEGER = 3 | image features per object and step taken as the noun's strongest downstream features
-- param: error_type VARCHAR = NULL | only generations with this error in generation_errors ('none': checked and correct; NULL: all)
-- param: k INTEGER = 50 | rows returned (0: all)
-- columns: run_id, layer, stream, feature, step, feature_key, n_prompts, n_pairs, own_attribution, other_attribution, own_share, binding_score, own_prompt_ids, other_prompt_ids, label
WITH g AS (
    SELECT graph_id, run_id, prompt_id, step
    FROM graphs
    WHERE status = 'ok'
      AND (getvariable('run_id') IS NULL OR run_id = getvariable('run_id'))
      AND (getvariable('step') IS NULL OR step = getvariable('step'))
      AND (getvariable('target_spec') IS NULL OR target_spec = getvariable('target_spec'))
      AND (getvariable('error_type') IS NULL OR EXISTS (
              SELECT 1 FROM generation_errors ge
              WHERE ge.run_id = graphs.run_id AND ge.prompt_id = graphs.prompt_id
                AND ge.error_type = getvariable('error_type')))
), pairs AS (
    SELECT b.* FROM binding_pairs b SEMI JOIN g USING (run_id, prompt_id)
), spans AS (   -- text positions of each pair's attribute word and object noun
    SELECT run_id, prompt_id, pair_index, 'attribute' AS role, attribute_start AS lo, attribute_end AS hi FROM pairs
    UNION ALL
    SELECT run_id, prompt_id, pair_index, 'object', object_start, object_end FROM pairs
), txt_img AS (   -- distinct LRM edges from text nodes on those positions into image nodes, per generation and step
    SELECT g.run_id, g.prompt_id, g.step, sp.pair_index, sp.role,
           s.node_type AS s_type, s.layer AS s_layer, s.feature AS s_feature, s.position AS s_position,
           t.layer AS t_layer, t.feature AS t_feature, t.position AS img_position,
           avg(e.weight) AS weight, count(DISTINCT g.graph_id) AS n_graphs
    FROM graph_edges e
    JOIN g USING (run_id, graph_id)
    JOIN graph_nodes s ON s.run_id = e.run_id AND s.graph_id = e.graph_id AND s.node = e.source
    JOIN graph_nodes t ON t.run_id = e.run_id AND t.graph_id = e.graph_id AND t.node = e.target
    JOIN spans sp ON sp.run_id = g.run_id AND sp.prompt_id = g.prompt_id AND s.position BETWEEN sp.lo AND sp.hi
    WHERE e.source_stream = 'txt' AND e.target_stream = 'img' AND s.node_type IN ('input', 'feature')
      AND t.position IS NOT NULL
    GROUP BY ALL
), noun_feats AS (   -- each object noun's strongest downstream image features, per generation and step
    SELECT run_id, prompt_id, step, pair_index, t_layer AS layer, t_feature AS feature, sum(abs(weight)) AS mass
    FROM txt_img
    WHERE role = 'object' AND t_feature IS NOT NULL
    GROUP BY run_id, prompt_id, step, pair_index, t_layer, t_feature
    QUALIFY row_number() OVER (PARTITION BY run_id, prompt_id, step, pair_index ORDER BY mass DESC, layer, feature)
            <= coalesce(getvariable('noun_features'), 3)
), gen_steps AS (
    SELECT DISTINCT run_id, prompt_id, step FROM g
), traced_acts AS (   -- image activations of the traced generations and steps only (keeps the join below small)
    SELECT a.run_id, a.prompt_id, a.step, a.layer, a.feature, a.position
    FROM activations a
    SEMI JOIN gen_steps s ON s.run_id = a.run_id AND s.prompt_id = a.prompt_id AND s.step = a.step
    WHERE a.stream = 'img'
), noun_region AS (
    SELECT DISTINCT nf.run_id, nf.prompt_id, nf.step, nf.pair_index, a.position
    FROM noun_feats nf
    JOIN traced_acts a ON a.run_id = nf.run_id AND a.layer = nf.layer AND a.feature = nf.feature
                      AND a.prompt_id = nf.prompt_id AND a.step = nf.step
), regions AS (
    SELECT s.run_id, s.prompt_id, s.step, r.pair_index, r.position, 'ground_truth' AS region_source
    FROM gen_steps s JOIN object_regions r USING (run_id, prompt_id)
    WHERE coalesce(getvariable('region'), 'auto') IN ('auto', 'ground_truth')
    UNION ALL
    SELECT n.run_id, n.prompt_id, n.step, n.pair_index, n.position, 'noun_features'
    FROM noun_region n
    WHERE coalesce(getvariable('region'), 'auto') = 'noun_features'
       OR (coalesce(getvariable('region'), 'auto') = 'auto' AND NOT EXISTS (
              SELECT 1 FROM object_regions r
              WHERE r.run_id = n.run_id AND r.prompt_id = n.prompt_id AND r.pair_index = n.pair_index))
), owner AS (   -- patches claimed by exactly one object
    SELECT run_id, prompt_id, step, position, any_value(pair_index) AS owner
    FROM regions
    GROUP BY ALL
    HAVING count(DISTINCT pair_index) = 1
), edges_owned AS (
    SELECT ti.run_id, ti.prompt_id, ti.pair_index, ti.step, abs(ti.weight) AS mass, o.owner = ti.pair_index AS own,
           CASE WHEN coalesce(getvariable('side'), 'receiver') = 'sender' THEN ti.s_layer ELSE ti.t_layer END AS layer,
           CASE WHEN coalesce(getvariable('side'), 'receiver') = 'sender' THEN 'txt' ELSE 'img' END AS stream,
           CASE WHEN coalesce(getvariable('side'), 'receiver') = 'sender' THEN ti.s_feature ELSE ti.t_feature END AS feature
    FROM txt_img ti
    JOIN owner o ON o.run_id = ti.run_id AND o.prompt_id = ti.prompt_id AND o.step = ti.step
                AND o.position = ti.img_position
    WHERE ti.role = 'attribute'
), grouped AS (
    SELECT run_id,
           CASE WHEN coalesce(getvariable('group_by'), 'feature') IN ('feature', 'layer') THEN layer END AS layer,
           stream,
           CASE WHEN coalesce(getvariable('group_by'), 'feature') = 'feature' THEN feature END AS feature,
           CASE WHEN coalesce(getvariable('group_by'), 'feature') = 'step' THEN step END AS step,
           count(DISTINCT prompt_id) AS n_prompts, count(DISTINCT (prompt_id, pair_index)) AS n_pairs,
           coalesce(sum(mass) FILTER (WHERE own), 0.0) AS own_attribution,
           coalesce(sum(mass) FILTER (WHERE NOT own), 0.0) AS other_attribution,
           list(DISTINCT prompt_id ORDER BY prompt_id) FILTER (WHERE own) AS own_prompt_ids,
           list(DISTINCT prompt_id ORDER BY prompt_id) FILTER (WHERE NOT own) AS other_prompt_ids
    FROM edges_owned
    WHERE coalesce(getvariable('group_by'), 'feature') <> 'feature' OR feature IS NOT NULL
    GROUP BY ALL
)
SELECT gr.run_id, gr.layer, gr.stream, gr.feature, gr.step,
       CASE WHEN gr.feature IS NOT NULL THEN 'L' || gr.layer || '.' || gr.stream || '.' || gr.feature END AS feature_key,
       gr.n_prompts, gr.n_pairs, gr.own_attribution, gr.other_attribution,
       gr.own_attribution / nullif(gr.own_attribution + gr.other_attribution, 0) AS own_share,
       (gr.own_attribution - gr.other_attribution) / nullif(gr.own_attribution + gr.other_attribution, 0) AS binding_score,
       gr.own_prompt_ids, gr.other_prompt_ids, f.label
FROM grouped gr
LEFT JOIN features f ON gr.feature IS NOT NULL AND f.run_id = gr.run_id AND f.layer = gr.layer AND f.stream = gr.stream
                    AND f.feature = gr.feature
ORDER BY CASE coalesce(getvariable('order_by'), 'own')
             WHEN 'other' THEN gr.other_attribution
             WHEN 'total' THEN gr.own_attribution + gr.other_attribution
             ELSE gr.own_attribution END DESC,
         gr.run_id, gr.layer NULLS FIRST, gr.feature, gr.step
LIMIT (SELECT CASE WHEN coalesce(getvariable('k'), 50) <= 0 THEN NULL ELSE coalesce(getvariable('k'), 50) END)
