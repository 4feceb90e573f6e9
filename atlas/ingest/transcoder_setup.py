"""The transcoders of an ingest run: loaded (folder or hub repo) or randomly initialised."""

from __future__ import annotations

import torch

from atlas.ingest.config import RunConfig
from atlas.ingest.encode import calibrate_encoder_bias_, transcoder_input
from atlas.model import MLPCapture
from atlas.transcoders import (
    TemporalAwareSAE,
    TemporalAwareTranscoder,
    load_transcoders,
    transcoder_checksum,
)

#: Prompts whose activations calibrate randomly initialised transcoders (see
#: :func:`atlas.ingest.encode.calibrate_encoder_bias_`). Fixed, so random-init is reproducible.
CALIBRATION_PROMPTS = [
    "a red car on a green field",
    "a blue bird sitting on a yellow flower",
    "a wooden table and a metal chair",
    "a photo of a cat next to a dog",
    "an oil painting of a city at night",
    "a green apple and a purple bowl",
    "a white house with a brown roof",
    "a person riding a bicycle in the rain",
]


def setup_transcoders(cfg: RunConfig, pipe, layers: list[int], gen: dict, device: str):
    """Return ``(modules keyed "img_6", transcoders-table rows, source string)``.

    ``cfg.transcoders == "random-init"`` builds recipe-initialised modules (unit-norm decoder,
    encoder = decoder^T, identity FiLM) seeded by ``cfg.random_init_seed`` and calibrated to
    ``cfg.random_init_density``; anything else is a folder or hub repo in the published layout.

    Raises:
        FileNotFoundError / CheckpointError: from :func:`atlas.transcoders.load_transcoders`.
    """
    d_model = pipe.transformer.inner_dim
    if cfg.transcoders == "random-init":
        modules = _random_init(cfg, pipe, layers, gen, device, d_model)
        source = f"random-init:seed={cfg.random_init_seed}:density={cfg.random_init_density}"
    else:
        modules = load_transcoders(
            cfg.transcoders, layers=layers, streams=cfg.streams, d_model=d_model,
            expansion_factor=cfg.expansion_factor, time_embed_dim=cfg.time_embed_dim,
            prefix=cfg.transcoder_prefix, device=device, dtype=torch.float32, role=cfg.role,
        )
        source = cfg.transcoders
    rows = []
    for key, tc in sorted(modules.items()):
        stream, layer = key.split("_")
        rows.append({
            "layer": int(layer), "stream": stream, "role": tc.role, "d_model": tc.d_model, "d_feat": tc.d_feat,
            "time_embed_dim": tc.time_embed_dim, "checksum": transcoder_checksum(tc), "source": source,
        })
    return modules, rows, source


@torch.no_grad()
def _random_init(cfg: RunConfig, pipe, layers, gen, device, d_model) -> dict:
    cls = TemporalAwareSAE if cfg.role == "sae" else TemporalAwareTranscoder
    modules = {}
    for i, (layer, stream) in enumerate((l, s) for l in layers for s in cfg.streams):
        tc = cls(d_model=d_model, expansion_factor=cfg.expansion_factor, time_embed_dim=cfg.time_embed_dim)
        tc.init_recipe_(generator=torch.Generator().manual_seed(cfg.random_init_seed * 1000 + i))
        modules[f"{stream}_{layer}"] = tc.to(device).eval()

    capture = MLPCapture(pipe.transformer, layers, cfg.streams)
    with capture:
        pipe(prompt=CALIBRATION_PROMPTS, output_type="latent",
             generator=[torch.Generator("cpu").manual_seed(k) for k in range(len(CALIBRATION_PROMPTS))], **gen)
    mask = pipe.tokenizer_2(CALIBRATION_PROMPTS, padding="max_length", max_length=gen["max_sequence_length"],
                            truncation=True, return_tensors="pt")["attention_mask"].bool()
    for key, tc in modules.items():
        stream, layer = key.split("_")
        inputs, sigmas = [], []
        for record in capture.steps:
            mlp = record.mlp[(int(layer), stream)]
            inp = transcoder_input(tc, mlp.x, mlp.y).float()
            if stream == "txt":  # padding positions are not part of the calibration data
                inp = inp[mask].unsqueeze(1)
                sigma = record.sigma[:, None].expand(mask.shape)[mask]
            else:
                sigma = record.sigma
            inputs.append(inp.reshape(len(sigma), -1, d_model))
            sigmas.append(sigma)
        # Pre-activations depend on sigma per row, so calibrate on all captures at once.
        calibrate_encoder_bias_(tc, torch.cat(_pad_same(inputs)).to(device), torch.cat(sigmas).to(device),
                                cfg.random_init_density)
    return modules


def _pad_same(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """All captures of one stream have the same sequence length; check rather than assume."""
    lengths = {t.shape[1] for t in tensors}
    if len(lengths) != 1:
        raise RuntimeError(f"captures of one stream differ in sequence length: {sorted(lengths)}")
    return tensors
