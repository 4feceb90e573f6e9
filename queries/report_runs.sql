-- answers: The ingest runs of the atlas with their provenance (model, transcoders, versions,
-- host, timing, configuration), for the report's index page.
-- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
-- columns: run_id, status, model_id, model_revision, transcoder_source, height, width, patch_px, n_steps, n_prompts, started_at, finished_at, config_hash, host, versions_json, model_json, config_json
SELECT run_id, status, model_id, model_revision, transcoder_source, height, width, patch_px, n_steps,
       n_prompts, started_at, finished_at, config_hash, host, versions_json, model_json, config_json
FROM runs
WHERE getvariable('run_id') IS NULL OR run_id = getvariable('run_id')
ORDER BY started_at, run_id
