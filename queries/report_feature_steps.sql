-- answers: Per feature and denoising step: firing count, density, mean and max activation and
-- the activation histogram (hist_counts: equal bins over (0, max_activation]).
-- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
-- columns: run_id, layer, stream, feature, step, sigma, firing_count, density, mean_activation, max_activation, hist_counts
SELECT run_id, layer, stream, feature, step, sigma, firing_count, density, mean_activation, max_activation,
       hist_counts
FROM feature_step_stats
WHERE getvariable('run_id') IS NULL OR run_id = getvariable('run_id')
ORDER BY run_id, layer, stream, feature, step
