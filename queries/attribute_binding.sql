-- answers: Attribute binding per prompt and attribute-object pair (binding_pairs, written by
-- `atlas analyze` for two-object prompts such as "a red cube and a blue sphere"): how much
-- attribution leaves the attribute word's text positions (its embedding input and the text
-- features there, direct LRM edges) into image-stream nodes on its own object's patches versus
-- on the other object's, over the prompt's graphs. Object patches come from the ground truth
-- where a world provides it (object_regions), otherwise from the patches where the object noun's
-- strongest downstream image features fire in that step (activations); patches claimed by both
-- objects count for neither. Each distinct LRM edge of a generation and step counts once (graphs
-- of one prompt and step share their edges). own/other_attribution sum |weight| (pre-activation
-- units); binding_score = (own - other) / (own + other), from -1 (all to the other object) to 1.
-- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
-- param: step INTEGER = NULL | only graphs of this denoising step (NULL: all steps pooled)
-- param: target_spec VARCHAR = NULL | only graphs of this --target spec (NULL: all)
-- param: region VARCHAR = auto | auto (ground truth where object_regions has it, else noun features), ground_truth or noun_features
-- param: noun_features INTEGER = 3 | image features per object and step taken as the noun's strongest downstream features
-- param: error_type VARCHAR = NULL | only generations with this error in generation_errors ('none': checked and correct; NULL: all)
-- columns: run_id, prompt_id, text, pair_index, attribute, object, other_object, region_source, n_graphs, steps, own_patches, other_patches, own_attribution, other_attribution, own_signed, other_signed, binding_score, errors
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
), patch_counts AS (
    SELECT run_id, prompt_id, owner AS pair_index, count(DISTINCT position) AS n_patches
    FROM owner GROUP BY ALL
), sources AS (
    SELECT run_id, prompt_id, pair_index, string_agg(DISTINCT region_source, ',' ORDER BY region_source) AS region_source
    FROM regions GROUP BY ALL
), attr AS (
    SELECT ti.run_id, ti.prompt_id, ti.pair_index,
           sum(abs(ti.weight)) FILTER (WHERE o.owner = ti.pair_index) AS own_attribution,
           sum(abs(ti.weight)) FILTER (WHERE o.owner <> ti.pair_index) AS other_attribution,
           sum(ti.weight) FILTER (WHERE o.owner = ti.pair_index) AS own_signed,
           sum(ti.weight) FILTER (WHERE o.owner <> ti.pair_index) AS other_signed
    FROM txt_img ti
    JOIN owner o ON o.run_id = ti.run_id AND o.prompt_id = ti.prompt_id AND o.step = ti.step
                AND o.position = ti.img_position
    WHERE ti.role = 'attribute'
    GROUP BY ALL
), per_gen AS (
    SELECT run_id, prompt_id, count(*) AS n_graphs, list(DISTINCT step ORDER BY step) AS steps
    FROM g GROUP BY ALL
), errs AS (
    SELECT run_id, prompt_id, list(DISTINCT error_type ORDER BY error_type) AS errors
    FROM generation_errors GROUP BY ALL
)
SELECT p.run_id, p.prompt_id, pr.text, p.pair_index, p.attribute, p.object, o.object AS other_object,
       src.region_source, pg.n_graphs, pg.steps,
       coalesce(pc.n_patches, 0) AS own_patches, coalesce(oc.n_patches, 0) AS other_patches,
       coalesce(a.own_attribution, 0.0) AS own_attribution, coalesce(a.other_attribution, 0.0) AS other_attribution,
       coalesce(a.own_signed, 0.0) AS own_signed, coalesce(a.other_signed, 0.0) AS other_signed,
       (coalesce(a.own_attribution, 0.0) - coalesce(a.other_attribution, 0.0))
           / nullif(coalesce(a.own_attribution, 0.0) + coalesce(a.other_attribution, 0.0), 0) AS binding_score,
       er.errors
FROM pairs p
JOIN pairs o ON o.run_id = p.run_id AND o.prompt_id = p.prompt_id AND o.pair_index <> p.pair_index
JOIN prompts pr ON pr.run_id = p.run_id AND pr.prompt_id = p.prompt_id
JOIN per_gen pg ON pg.run_id = p.run_id AND pg.prompt_id = p.prompt_id
LEFT JOIN attr a ON a.run_id = p.run_id AND a.prompt_id = p.prompt_id AND a.pair_index = p.pair_index
LEFT JOIN patch_counts pc ON pc.run_id = p.run_id AND pc.prompt_id = p.prompt_id AND pc.pair_index = p.pair_index
LEFT JOIN patch_counts oc ON oc.run_id = p.run_id AND oc.prompt_id = p.prompt_id AND oc.pair_index = o.pair_index
LEFT JOIN sources src ON src.run_id = p.run_id AND src.prompt_id = p.prompt_id AND src.pair_index = p.pair_index
LEFT JOIN errs er ON er.run_id = p.run_id AND er.prompt_id = p.prompt_id
ORDER BY p.run_id, p.prompt_id, p.pair_index
