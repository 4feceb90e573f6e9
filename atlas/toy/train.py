"""Train the toy FLUX pipeline on the toy world, reproducibly, in one command.

    python -m atlas.toy.train --out data/toy/pipeline --seed 0

Stages (each with a progress bar; times are printed and written to `<out>/../training.json`):
1. VAE: `AutoencoderKL` (block_out_channels (16, 32), scale factor 2, 4 latent channels) trained
   on rendered training scenes with MSE + a small KL term, decoding posterior samples so the
   decoder tolerates imperfect latents. Its latent mean/std are then registered as the config's
   `shift_factor` / `scaling_factor`, which FluxPipeline uses to decode.
2. Latent pool: `--pool` training scenes (30% single objects, 70% pairs) rendered and encoded once
   (posterior means, shifted and scaled), so the transformer stage never runs the VAE.
3. Transformer + text encoders, jointly: `FluxTransformer2DModel` (d_model 96, 4 double + 2 single
   blocks), `CLIPTextModel` (pooled vector) and `T5EncoderModel` (text stream), tokenizers from
   `atlas.model.tiny.build_tiny_tokenizer`. Rectified flow on packed VAE latents:
   x_s = (1 - s) x0 + s n, target n - x0, the transformer called exactly as FluxPipeline calls it
   (timestep = s in [0, 1], txt_ids zeros, img_ids from `_prepare_latent_image_ids`, CLIP pooled
   output, T5 last hidden state of max_length-padded ids without attention mask). s is drawn
   uniformly in [0, 1] for half of each batch and from the 4-step schedule {1, .75, .5, .25} for
   the other half (the settings the toy is run with). Captions of pair scenes use a template
   drawn per sample. AdamW with warm-up and cosine decay.
   What the transformer reads: FluxPipeline feeds it all `max_sequence_length` T5 positions with
   no attention mask, and the jointly trained T5 turns its </s> and padding outputs into a summary
   of the whole caption, from which the transformer takes colour and shape (transplanting the
   </s> + padding outputs of "a red square" into "a blue square" draws a red square). That
   conjunctive code is what makes held-out colour-shape combinations come out with the shape their
   colour was trained with. Two changes fixed most of it: a text stream of 16 T5 tokens instead of
   32 (`TOY_MAX_LENGTH`; the grammar's longest caption is 11 tokens, so fewer padding positions
   carry the summary) and 6,500 steps instead of 4,500 (pairs with a held-out combination all
   right: 28% at 32 tokens / 4,500 steps, 65% at 16 / 4,500, 85% at 16 / 6,500). Tried and worse,
   each at 32 tokens and 4,500 steps (training pairs / held-out combinations all right, vs 90% /
   28%): hiding the summary by swapping in another caption's (about 30% / -), sigma uniform only
   with a 100k-scene pool (84% / 19%), text encoders at 0.3x lr (12% / 6%: binding breaks, as word
   order reaches the transformer only through T5's relative-position mixing), frozen text encoders
   (40% / 18%), lr 2e-3 (31% / 11%: lower loss, binding broken), a 1-layer T5 (39% / 17%).
4. Save with `FluxPipeline.save_pretrained(out)` (fp32 safetensors), reload it through
   `atlas.model.load_pipeline(out)` (the ordinary local-folder path) and score it with the pixel
   oracle on seen and held-out prompts (`atlas.toy.evaluate`).

Everything is seeded from `--seed`; on one machine with the same thread count the weights come
out bit-identical (the shipped `data/toy/pipeline` is the output of `--threads 1 --seed 0`; `make toy`
uses 2 threads, faster, equal within noise). Run it under `nice` on a shared machine; it sets torch's thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
from tqdm.auto import tqdm

from atlas.model.loading import TOY_RECOMMENDED
from atlas.model.tiny import build_tiny_tokenizer, tiny_clip, tiny_t5, tiny_transformer, tiny_vae
from atlas.toy.world import PAIR_TEMPLATES, caption, sample_scene

__all__ = ["TrainConfig", "build_components", "train_vae", "encode_pool", "train_transformer",
           "assemble_pipeline", "main"]

STEP_SIGMAS = (1.0, 0.75, 0.5, 0.25)

#: Token length of both toy tokenizers (CLIP and T5 side) and the T5 text stream the transformer
#: reads: `max_sequence_length` of the toy's recommended settings (16).
TOY_MAX_LENGTH = TOY_RECOMMENDED["max_sequence_length"]


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (all stages). Defaults are the shipped run's."""

    seed: int = 0
    threads: int = 2
    vae_steps: int = 600
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl: float = 1e-5
    pool: int = 30000
    steps: int = 6500
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.01
    p_step_sigma: float = 0.5
    text_lr_scale: float = 1.0
    p_single: float = 0.3


def build_components(seed: int) -> dict:
    """Fresh, seeded components: {"vae", "transformer", "text_encoder", "text_encoder_2",
    "tokenizer", "tokenizer_2", "scheduler"} (the FluxPipeline constructor's arguments)."""
    tokenizer, tokenizer_2 = build_tiny_tokenizer("clip"), build_tiny_tokenizer("t5")
    for tok in (tokenizer, tokenizer_2):
        tok.model_max_length = TOY_MAX_LENGTH
    torch.manual_seed(seed)
    vae = tiny_vae()
    transformer = tiny_transformer()
    text_encoder = tiny_clip(len(tokenizer))
    text_encoder_2 = tiny_t5(len(tokenizer_2), relative_attention_num_buckets=32)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return {"vae": vae, "transformer": transformer, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "tokenizer": tokenizer, "tokenizer_2": tokenizer_2, "scheduler": scheduler}


def _to_pixels(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] images -> float [B, 3, H, W] in [-1, 1] (the VAE's input range)."""
    arr = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def train_vae(vae: AutoencoderKL, cfg: TrainConfig, rng: np.random.Generator) -> dict:
    """Train the VAE in place on rendered training-split scenes. Returns {"loss", "psnr_db",
    "seconds"}: the last 100 steps' mean loss and the PSNR (dB, pixel range [0, 1]) of posterior-
    mean reconstructions of 256 fresh training scenes."""
    t0, c0 = time.time(), time.process_time()
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(100, cfg.vae_steps))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    losses: list[float] = []
    bar = tqdm(range(cfg.vae_steps), desc="vae", dynamic_ncols=True)
    for step in bar:
        x = _to_pixels([sample_scene(rng, "train").image() for _ in range(cfg.vae_batch)])
        post = vae.encode(x).latent_dist
        z = post.sample(generator=gen)
        rec = vae.decode(z).sample
        mse = torch.mean((rec - x) ** 2)
        kl = post.kl().mean() / z[0].numel()
        loss = mse + cfg.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(mse.item())
        if step % 20 == 0:
            bar.set_postfix(mse=f"{np.mean(losses[-50:]):.5f}")
    vae.eval()
    with torch.no_grad():
        x = _to_pixels([sample_scene(rng, "train").image() for _ in range(256)])
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        mse01 = float(torch.mean(((rec - x) / 2) ** 2))
    return {"loss": float(np.mean(losses[-100:])), "psnr_db": 10 * math.log10(1.0 / max(mse01, 1e-12)),
            "seconds": time.time() - t0, "cpu_seconds": time.process_time() - c0}


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, cfg: TrainConfig, rng: np.random.Generator,
                chunk: int = 500) -> tuple[torch.Tensor, list, dict]:
    """Render `cfg.pool` training scenes, encode them (posterior means), register the latents'
    mean and 1/std as the VAE's shift_factor / scaling_factor, and return
    (packed latents [N, 64, 16] scaled as FluxPipeline expects, scenes, {"shift", "scale",
    "seconds"})."""
    t0, c0 = time.time(), time.process_time()
    scenes = [sample_scene(rng, "train", p_single=cfg.p_single) for _ in range(cfg.pool)]
    lat = []
    for i in tqdm(range(0, len(scenes), chunk), desc="encode", dynamic_ncols=True):
        x = _to_pixels([s.image() for s in scenes[i:i + chunk]])
        lat.append(vae.encode(x).latent_dist.mean)
    lat = torch.cat(lat)                                          # [N, 4, 16, 16]
    shift, std = float(lat.mean()), float(lat.std())
    scale = 1.0 / std
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    lat = (lat - shift) * scale
    n, c, h, w = lat.shape
    packed = FluxPipeline._pack_latents(lat, n, c, h, w).contiguous()
    return packed, scenes, {"shift": shift, "scale": scale, "seconds": time.time() - t0,
                           "cpu_seconds": time.process_time() - c0}


def _scene_captions(scene) -> list[str]:
    if len(scene.objects) == 1:
        return [scene.caption]
    return [caption(scene.objects, t) for t in PAIR_TEMPLATES]


def train_transformer(comp: dict, packed: torch.Tensor, scenes: list, cfg: TrainConfig,
                      rng: np.random.Generator) -> dict:
    """Train transformer + both text encoders jointly on the latent pool (rectified flow, see the
    module docstring). Returns {"loss" (mean of the last 200 steps), "seconds", "steps_per_s"}."""
    t0, c0 = time.time(), time.process_time()
    transformer, te1, te2 = comp["transformer"], comp["text_encoder"], comp["text_encoder_2"]
    tok1, tok2 = comp["tokenizer"], comp["tokenizer_2"]
    # Tokenise every caption once, exactly as FluxPipeline does.
    caps = sorted({c for s in scenes for c in _scene_captions(s)})
    cap_index = {c: i for i, c in enumerate(caps)}
    ids1 = tok1(caps, padding="max_length", max_length=tok1.model_max_length, truncation=True,
                return_tensors="pt").input_ids
    ids2 = tok2(caps, padding="max_length", max_length=TOY_MAX_LENGTH, truncation=True,
                return_tensors="pt").input_ids
    options = [[cap_index[c] for c in _scene_captions(s)] for s in scenes]
    n_tok = packed.shape[1]
    img_ids = FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32)
    txt_ids = torch.zeros(TOY_MAX_LENGTH, 3)
    assert img_ids.shape[0] == n_tok

    train_text = cfg.text_lr_scale > 0
    frozen: tuple[torch.Tensor, torch.Tensor] | None = None
    if train_text:
        text_params = [p for m in (te1, te2) for p in m.parameters()]
        for m in (te1, te2):
            m.train()
    else:  # frozen encoders: embed every caption once
        text_params = []
        for m in (te1, te2):
            m.eval().requires_grad_(False)
        with torch.no_grad():
            frozen = (te1(ids1, output_hidden_states=False).pooler_output, te2(ids2, output_hidden_states=False)[0])
    transformer.train()
    params = list(transformer.parameters()) + text_params
    groups = [{"params": list(transformer.parameters()), "lr": cfg.lr}]
    if text_params:
        groups.append({"params": text_params, "lr": cfg.lr * cfg.text_lr_scale})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup, cfg.steps))
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    step_sigmas = torch.tensor(STEP_SIGMAS)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="transformer", dynamic_ncols=True)
    for step in bar:
        idx = rng.integers(0, len(scenes), cfg.batch)
        cap = torch.tensor([options[i][int(rng.integers(len(options[i])))] for i in idx])
        x0 = packed[torch.from_numpy(idx)]
        b = x0.shape[0]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.rand(b, generator=gen)
        use_step = torch.rand(b, generator=gen) < cfg.p_step_sigma
        sigma = torch.where(use_step, step_sigmas[torch.randint(0, 4, (b,), generator=gen)], sigma)
        s = sigma[:, None, None]
        xs = (1 - s) * x0 + s * noise
        if frozen is None:
            pooled = te1(ids1[cap], output_hidden_states=False).pooler_output
            seq = te2(ids2[cap], output_hidden_states=False)[0]
        else:
            pooled, seq = frozen[0][cap], frozen[1][cap]
        pred = transformer(hidden_states=xs, timestep=sigma, guidance=None, pooled_projections=pooled,
                           encoder_hidden_states=seq, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        loss = torch.mean((pred - (noise - x0)) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
    for m in (transformer, te1, te2):
        m.eval()
    secs = time.time() - t0
    return {"loss": float(np.mean(losses[-200:])), "seconds": secs, "cpu_seconds": time.process_time() - c0,
            "steps_per_s": cfg.steps / secs, "loss_curve": [float(np.mean(losses[i:i + 100]))
                                                            for i in range(0, len(losses), 100)]}


def assemble_pipeline(comp: dict) -> FluxPipeline:
    """Wrap trained components into a stock FluxPipeline (every module in eval mode)."""
    pipe = FluxPipeline(**comp)
    for name in ("vae", "transformer", "text_encoder", "text_encoder_2"):
        getattr(pipe, name).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def main(argv: list[str] | None = None) -> dict:
    """Command line: train all stages, save the pipeline to --out, evaluate it; returns the record
    that is also written to `<out>/../training.json` (or --record)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for FluxPipeline.save_pretrained")
    ap.add_argument("--record", default=None, help="where to write the JSON record (default <out>/../training.json)")
    defaults = TrainConfig()
    for key, value in asdict(defaults).items():
        ap.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    ap.add_argument("--eval-seeds", type=int, default=2, help="seeds per prompt in the evaluation")
    args = ap.parse_args(argv)
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(args.out)
    record: dict = {"command": "python -m atlas.toy.train " + " ".join(argv if argv is not None else os.sys.argv[1:]),
                    "config": asdict(cfg), "torch": torch.__version__, "threads": cfg.threads}
    t_all = time.time()
    rng = np.random.default_rng(cfg.seed)
    comp = build_components(cfg.seed)

    record["vae"] = train_vae(comp["vae"], cfg, rng)
    print(f"[vae] {record['vae']['seconds']:.0f} s, mse {record['vae']['loss']:.5f}, "
          f"reconstruction PSNR {record['vae']['psnr_db']:.1f} dB", flush=True)
    packed, scenes, record["pool"] = encode_pool(comp["vae"], cfg, rng)
    print(f"[pool] {len(scenes)} scenes in {record['pool']['seconds']:.0f} s; latent shift "
          f"{record['pool']['shift']:.4f}, scale {record['pool']['scale']:.4f}", flush=True)
    record["transformer"] = train_transformer(comp, packed, scenes, cfg, rng)
    print(f"[transformer] {record['transformer']['seconds']:.0f} s "
          f"({record['transformer']['steps_per_s']:.2f} steps/s), final loss {record['transformer']['loss']:.4f}",
          flush=True)
    record["train_seconds"] = time.time() - t_all

    pipe = assemble_pipeline(comp)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    record["size_mb"] = _dir_mb(out)
    print(f"[save] {out} ({record['size_mb']:.2f} MB)", flush=True)

    from atlas.model.loading import load_pipeline
    from atlas.toy.evaluate import evaluate, format_scores
    t_eval = time.time()
    scores = evaluate(load_pipeline(str(out)), seeds=args.eval_seeds)
    record["eval"] = scores
    record["eval_seconds"] = time.time() - t_eval
    print(format_scores(scores), flush=True)
    record_path = Path(args.record) if args.record else out.parent / "training.json"
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"[done] training {record['train_seconds'] / 60:.1f} min; record in {record_path}", flush=True)
    return record


if __name__ == "__main__":
    main()
