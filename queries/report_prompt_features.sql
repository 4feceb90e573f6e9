-- answers: The most active features of each generation per layer and stream (by their strongest
-- activation over steps and positions), with how many (step, position) pairs fired.
-- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
-- param: k INTEGER = 8 | features per generation, layer and stream
-- columns: run_id, prompt_id, layer, stream, rank, feature, max_value, n_firings
SELECT run_id, prompt_id, layer, stream,
       row_number() OVER (PARTITION BY run_id, prompt_id, layer, stream ORDER BY max(value) DESC, feature) AS rank,
       feature, max(value) AS max_value, count(*) AS n_firings
FROM activations
WHERE getvariable('run_id') IS NULL OR run_id = getvariable('run_id')
GROUP BY run_id, prompt_id, layer, stream, feature
QUALIFY rank <= coalesce(getvariable('k'), 8)
ORDER BY run_id, prompt_id, layer, stream, rank
