-- answers: Generation errors per generation (table generation_errors, filled by `atlas
-- label-errors` from the toy world's oracle or a user's labels): which object and attribute is
-- wrong and how (expected vs observed), with the prompt, its seed and the label's source.
-- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
-- param: error_type VARCHAR = NULL | only this error type (NULL: every error; 'none': the generations checked and found correct)
-- param: source VARCHAR = NULL | only labels from this source (oracle or labels:<file name>; NULL: all)
-- columns: run_id, prompt_id, text, seed, error_type, object_index, object, attribute, expected, observed, source, detail
SELECT e.run_id, e.prompt_id, p.text, p.seed, e.error_type, e.object_index, e.object, e.attribute, e.expected,
       e.observed, e.source, e.detail
FROM generation_errors e
JOIN prompts p USING (run_id, prompt_id)
WHERE (getvariable('run_id') IS NULL OR e.run_id = getvariable('run_id'))
  AND (CASE WHEN getvariable('error_type') IS NULL THEN e.error_type <> 'none'
            ELSE e.error_type = getvariable('error_type') END)
  AND (getvariable('source') IS NULL OR e.source = getvariable('source'))
ORDER BY e.run_id, e.prompt_id, e.object_index NULLS FIRST, e.error_type, e.source
