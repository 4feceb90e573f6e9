-- answers: The top features per layer and stream, ranked by feature density (how often they
-- fire) or by strength (their maximum or mean activation), over all denoising steps.
-- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
-- param: order_by VARCHAR = density | density, max_activation or mean_activation
-- param: k INTEGER = 10 | features per (layer, stream)
-- param: layer INTEGER = NULL | only this double-stream layer (NULL: all)
-- param: stream VARCHAR = NULL | img or txt (NULL: both)
-- columns: run_id, layer, stream, rank, feature, firing_count, density, mean_activation, max_activation, n_prompts, label
SELECT run_id, layer, stream,
       row_number() OVER (
           PARTITION BY run_id, layer, stream
           ORDER BY CASE coalesce(getvariable('order_by'), 'density')
                        WHEN 'max_activation' THEN max_activation
                        WHEN 'mean_activation' THEN mean_activation
                        ELSE density END DESC, feature) AS rank,
       feature, firing_count, density, mean_activation, max_activation, n_prompts, label
FROM features
WHERE (getvariable('run_id') IS NULL OR run_id = getvariable('run_id'))
  AND (getvariable('layer') IS NULL OR layer = getvariable('layer'))
  AND (getvariable('stream') IS NULL OR stream = getvariable('stream'))
QUALIFY rank <= coalesce(getvariable('k'), 10)
ORDER BY run_id, layer, stream, rank
