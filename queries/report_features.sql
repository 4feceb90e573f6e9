-- answers: Every feature that fired, with its statistics over all steps and its label, one row
-- per (run, layer, stream, feature): the list of the report's feature pages.
-- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
-- columns: run_id, layer, stream, feature, firing_count, density, mean_activation, max_activation, n_prompts, label
SELECT run_id, layer, stream, feature, firing_count, density, mean_activation, max_activation, n_prompts, label
FROM features
WHERE getvariable('run_id') IS NULL OR run_id = getvariable('run_id')
ORDER BY run_id, layer, stream, feature
