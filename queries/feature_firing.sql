-- answers: Where a feature fires: the prompts, denoising steps and positions (image patch with
-- its pixel box, or text token) with its activation, strongest first.
-- param: layer INTEGER = 0 | double-stream layer of the feature
-- param: stream VARCHAR = img | img or txt
-- param: feature INTEGER = 0 | feature index
-- param: run_id VARCHAR = NULL | restrict to one run (NULL: all runs)
-- param: step INTEGER = NULL | only this denoising step (NULL: all)
-- param: max_rows INTEGER = 100 | rows returned
-- columns: run_id, prompt_id, text, step, sigma, position, token, x0, y0, x1, y1, value
SELECT a.run_id, a.prompt_id, p.text, a.step, a.sigma, a.position, t.token,
       CASE WHEN a.stream = 'img' THEN (a.position % (r.width // r.patch_px)) * r.patch_px END AS x0,
       CASE WHEN a.stream = 'img' THEN (a.position // (r.width // r.patch_px)) * r.patch_px END AS y0,
       CASE WHEN a.stream = 'img' THEN (a.position % (r.width // r.patch_px) + 1) * r.patch_px END AS x1,
       CASE WHEN a.stream = 'img' THEN (a.position // (r.width // r.patch_px) + 1) * r.patch_px END AS y1,
       a.value
FROM activations a
JOIN prompts p USING (run_id, prompt_id)
JOIN runs r USING (run_id)
LEFT JOIN prompt_tokens t
       ON a.stream = 'txt' AND t.run_id = a.run_id AND t.prompt_id = a.prompt_id AND t.position = a.position
WHERE a.layer = coalesce(getvariable('layer'), 0)
  AND a.stream = coalesce(getvariable('stream'), 'img')
  AND a.feature = coalesce(getvariable('feature'), 0)
  AND (getvariable('run_id') IS NULL OR a.run_id = getvariable('run_id'))
  AND (getvariable('step') IS NULL OR a.step = getvariable('step'))
ORDER BY a.value DESC, a.run_id, a.prompt_id, a.step, a.position
LIMIT coalesce(getvariable('max_rows'), 100)
