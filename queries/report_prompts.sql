-- answers: Every generation (prompt and seed) with its generated image's file (relative to the
-- atlas folder) and size, for the report's prompt pages.
-- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
-- columns: run_id, prompt_id, text, seed, source_file, source_line, n_tokens, n_tokens_full, truncated, image_path, image_height, image_width, image_sha256
SELECT p.run_id, p.prompt_id, p.text, p.seed, p.source_file, p.source_line, p.n_tokens, p.n_tokens_full,
       p.truncated, i.path AS image_path, i.height AS image_height, i.width AS image_width,
       i.sha256 AS image_sha256
FROM prompts p
LEFT JOIN images i USING (run_id, prompt_id)
WHERE getvariable('run_id') IS NULL OR p.run_id = getvariable('run_id')
ORDER BY p.run_id, p.prompt_id
