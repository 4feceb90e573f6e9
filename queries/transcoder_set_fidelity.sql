-- answers: End-to-end fidelity of transcoder sets: the final latent's MSE and cosine and the
-- image PSNR when every covered MLP is replaced by its transcoder (no error term), against
-- the original pipeline, next to the set's mean per-layer FVU and L0.
-- param: role VARCHAR = NULL | transcoder or sae (NULL: both)
-- columns: source, role, members, latent_mse, latent_cosine, image_psnr, mean_fvu, mean_l0, n_prompts, model_id, measured_at
SELECT s.source, s.role, s.members, s.latent_mse, s.latent_cosine, s.image_psnr,
       (SELECT avg(m.fvu) FROM transcoder_metrics m
         WHERE m.source = s.source AND m.role = s.role AND m.step IS NULL) AS mean_fvu,
       (SELECT avg(m.l0) FROM transcoder_metrics m
         WHERE m.source = s.source AND m.role = s.role AND m.step IS NULL) AS mean_l0,
       s.n_prompts, s.model_id, s.measured_at
FROM transcoder_set_metrics s
WHERE getvariable('role') IS NULL OR s.role = getvariable('role')
ORDER BY s.role, s.measured_at DESC
