-- answers: Transcoder fidelity and the sparsity-faithfulness trade-off: per layer and stream,
-- FVU (nMSE), explained variance, L0 and dead fraction of every evaluated transcoder or SAE
-- (all denoising steps pooled, or per step), so transcoders can be compared with SAEs on the
-- same layers. End-to-end scores of whole sets: transcoder_set_fidelity.
-- param: role VARCHAR = NULL | transcoder or sae (NULL: both)
-- param: by_step BOOLEAN = false | true: one row per denoising step instead of pooled
-- columns: source, role, layer, stream, step, sigma, d_feat, fvu, explained_variance, l0, dead_fraction, n_rows, model_id, measured_at
SELECT source, role, layer, stream, step, sigma, d_feat, fvu, explained_variance, l0, dead_fraction,
       n_rows, model_id, measured_at
FROM transcoder_metrics
WHERE (getvariable('role') IS NULL OR role = getvariable('role'))
  AND (CASE WHEN coalesce(getvariable('by_step'), false) THEN step IS NOT NULL ELSE step IS NULL END)
ORDER BY role, layer, stream, step NULLS FIRST, measured_at DESC
