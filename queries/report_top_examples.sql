-- answers: The top-activating examples of every feature per denoising step (rank 1 = strongest),
-- with the strongest position's pixel box (image stream) or token (text stream).
-- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
-- param: max_rank INTEGER = 5 | examples kept per feature and step
-- columns: run_id, layer, stream, feature, step, sigma, rank, prompt_id, position, value, token, x0, y0, x1, y1
SELECT run_id, layer, stream, feature, step, sigma, rank, prompt_id, position, value, token, x0, y0, x1, y1
FROM top_examples
WHERE rank <= coalesce(getvariable('max_rank'), 5)
  AND (getvariable('run_id') IS NULL OR run_id = getvariable('run_id'))
ORDER BY run_id, layer, stream, feature, step, rank
