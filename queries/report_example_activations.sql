-- answers: For every top example (rank <= max_rank), all activations of its feature in that
-- generation and denoising step: the per-patch heatmap (image stream) or per-token shading
-- (text stream) drawn over the example.
-- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
-- param: max_rank INTEGER = 5 | examples per feature and step (as in report_top_examples)
-- columns: run_id, layer, stream, feature, prompt_id, step, position, value
WITH ex AS (
    SELECT DISTINCT run_id, layer, stream, feature, prompt_id, step
    FROM top_examples
    WHERE rank <= coalesce(getvariable('max_rank'), 5)
      AND (getvariable('run_id') IS NULL OR run_id = getvariable('run_id'))
)
SELECT a.run_id, a.layer, a.stream, a.feature, a.prompt_id, a.step, a.position, a.value
FROM activations a
SEMI JOIN ex ON a.run_id = ex.run_id AND a.layer = ex.layer AND a.stream = ex.stream
            AND a.feature = ex.feature AND a.prompt_id = ex.prompt_id AND a.step = ex.step
ORDER BY a.run_id, a.layer, a.stream, a.feature, a.prompt_id, a.step, a.position
