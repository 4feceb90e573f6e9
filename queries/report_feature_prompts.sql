-- answers: The prompts each feature fires in: per feature, the generations where it fired, with
-- how many (step, position) pairs fired and the strongest activation, strongest first.
-- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
-- param: k INTEGER = 20 | prompts kept per feature
-- columns: run_id, layer, stream, feature, rank, prompt_id, n_firings, max_value
SELECT run_id, layer, stream, feature,
       row_number() OVER (PARTITION BY run_id, layer, stream, feature
                          ORDER BY max(value) DESC, prompt_id) AS rank,
       prompt_id, count(*) AS n_firings, max(value) AS max_value
FROM activations
WHERE getvariable('run_id') IS NULL OR run_id = getvariable('run_id')
GROUP BY run_id, layer, stream, feature, prompt_id
QUALIFY rank <= coalesce(getvariable('k'), 20)
ORDER BY run_id, layer, stream, feature, rank
