-- answers: The text-stream tokens of every prompt by position (padding excluded).
-- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
-- columns: run_id, prompt_id, position, token
SELECT run_id, prompt_id, position, token
FROM prompt_tokens
WHERE getvariable('run_id') IS NULL OR run_id = getvariable('run_id')
ORDER BY run_id, prompt_id, position
