-- answers: Features that co-fire with a feature: other features (any layer, same stream) active
-- at the same generation, denoising step and position, with how often (count, and the
-- fraction of the feature's firings they share) and how strongly.
-- param: layer INTEGER = 0 | double-stream layer of the feature
-- param: stream VARCHAR = img | img or txt
-- param: feature INTEGER = 0 | feature index
-- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
-- param: k INTEGER = 20 | co-firing features returned
-- columns: run_id, layer, stream, feature, co_count, co_fraction, mean_value, label
WITH anchor AS (
    SELECT run_id, prompt_id, step, position
    FROM activations
    WHERE layer = coalesce(getvariable('layer'), 0)
      AND stream = coalesce(getvariable('stream'), 'img')
      AND feature = coalesce(getvariable('feature'), 0)
      AND (getvariable('run_id') IS NULL OR run_id = getvariable('run_id'))
), n_anchor AS (
    SELECT run_id, count(*) AS n FROM anchor GROUP BY run_id
)
SELECT a.run_id, a.layer, a.stream, a.feature, count(*) AS co_count,
       count(*) / any_value(n.n) AS co_fraction, avg(a.value) AS mean_value, any_value(f.label) AS label
FROM activations a
JOIN anchor USING (run_id, prompt_id, step, position)
JOIN n_anchor n USING (run_id)
LEFT JOIN features f USING (run_id, layer, stream, feature)
WHERE a.stream = coalesce(getvariable('stream'), 'img')
  AND NOT (a.layer = coalesce(getvariable('layer'), 0) AND a.feature = coalesce(getvariable('feature'), 0))
GROUP BY a.run_id, a.layer, a.stream, a.feature
ORDER BY co_count DESC, a.layer, a.feature
LIMIT coalesce(getvariable('k'), 20)
