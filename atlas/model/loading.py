"""Load a FluxPipeline from a built-in name, a local folder or a Hugging Face hub id.

`load_pipeline` is the one entry point the rest of the atlas uses; nothing downstream
special-cases the built-in models. Hub loading goes through diffusers' ordinary
`FluxPipeline.from_pretrained`, so huggingface_hub's cache (HF_HOME / HF_HUB_CACHE), offline
mode (HF_HUB_OFFLINE=1) and token (HF_TOKEN) all apply as usual.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import FluxPipeline

from atlas.model.tiny import TINY_RECOMMENDED, build_tiny_pipeline

__all__ = [
    "DEFAULT_MODEL_ID", "FLUX_SCHNELL_RECOMMENDED", "TOY_PIPELINE_DIR", "TOY_RECOMMENDED", "BUILTIN_MODELS",
    "ModelLoadError",
    "load_pipeline", "recommended_settings", "describe_pipeline",
]

#: The model the paper's transcoders were trained on.
DEFAULT_MODEL_ID = "black-forest-labs/FLUX.1-schnell"

#: The paper's generation settings for FLUX.1-schnell (512x512, 4 steps, no guidance).
FLUX_SCHNELL_RECOMMENDED = {"height": 512, "width": 512, "num_inference_steps": 4, "guidance_scale": 0.0,
                            "max_sequence_length": 256}

#: Folder of the shipped toy pipeline (a `save_pretrained` output; trained by
#: `python -m atlas.toy.train --out data/toy/pipeline --seed 0`, see data/toy/README.md).
TOY_PIPELINE_DIR = Path(__file__).resolve().parents[2] / "data" / "toy" / "pipeline"

#: Settings the toy pipeline was trained for (32x32, 4 schnell-style steps, no guidance, 16 T5 tokens:
#: the longest caption of the toy grammar is 11 tokens, and fewer padding positions made held-out
#: colour-shape combinations generalise better; see atlas/toy/train.py).
TOY_RECOMMENDED = {"height": 32, "width": 32, "num_inference_steps": 4, "guidance_scale": 0.0,
                   "max_sequence_length": 16}

#: Built-in models: name -> (builder(seed) -> FluxPipeline, or the path of a saved pipeline folder
#: loaded like any local folder; recommended generation settings).
BUILTIN_MODELS: dict[str, tuple[Callable[..., FluxPipeline] | Path, dict[str, Any]]] = {
    "tiny": (build_tiny_pipeline, TINY_RECOMMENDED),
    "toy": (TOY_PIPELINE_DIR, TOY_RECOMMENDED),
}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
_SNAPSHOT_RE = re.compile(r"snapshots[/\\]([0-9a-f]{40})(?:[/\\]|$)")


class ModelLoadError(OSError):
    """A pipeline could not be loaded (not cached while offline, no such folder, bad repo id...)."""


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use a torch.dtype or one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1 or model.endswith("/")


def _hub_help(model: str) -> str:
    return (f"To use {model!r} offline, download it once on a machine with network access "
            f"(`huggingface-cli download {model}`, or `hf download {model}` with huggingface_hub>=1.0) into the "
            "hub cache and point HF_HOME (or HF_HUB_CACHE) at that cache here, or pass a local folder written by "
            "`FluxPipeline.save_pretrained` / a downloaded snapshot. Gated or private repos also need HF_TOKEN. "
            f"Built-in models that need no download: {sorted(BUILTIN_MODELS)}.")


def load_pipeline(model: str = DEFAULT_MODEL_ID, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype | str | None = None, revision: str | None = None,
                  local_files_only: bool | None = None, seed: int = 0) -> FluxPipeline:
    """Load a FluxPipeline, put every component in `.eval()` and move it to `device`.

    model: a built-in name (a key of `BUILTIN_MODELS`: built in code from `seed`, or a shipped
    folder loaded exactly like a local folder, e.g. "toy"), an existing
    local folder (a `save_pretrained` output or a hub snapshot; loaded with
    `local_files_only=True`), or a hub repo id "owner/name" (loaded with `revision` and
    `local_files_only`; None leaves the choice to huggingface_hub, which honours HF_HUB_OFFLINE).
    dtype: torch dtype or name ("bfloat16", "fp16", ...); None keeps the stored dtype (float32
    for built-ins). `seed` only matters for built-ins. The progress bar is disabled.

    Raises ValueError for an unknown built-in name (a bare word that is no folder) or an
    unknown dtype; ModelLoadError (an OSError) when a folder does not exist or a hub id cannot
    be loaded (e.g. offline and not cached), with instructions on how to fix it.
    """
    torch_dtype = _resolve_dtype(dtype)
    # Recent diffusers (0.42 here) rename from_pretrained's torch_dtype to dtype with a FutureWarning; the old
    # name works in every version we support (>= 0.32), so the warning is silenced, not followed.
    warnings.filterwarnings("ignore", message=".*torch_dtype.*is deprecated", category=FutureWarning)
    builtin = BUILTIN_MODELS.get(model, (None,))[0]
    if builtin is not None and not callable(builtin):
        folder = str(builtin)
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            raise ModelLoadError(f"built-in model {model!r} is a saved pipeline expected at {folder!r}, which holds "
                                 "no model_index.json (see the README.md next to it for how it is trained).")
        pipe = FluxPipeline.from_pretrained(folder, torch_dtype=torch_dtype, local_files_only=True)
        source = {"kind": "builtin", "revision": None}
    elif builtin is not None:
        pipe = builtin(seed=seed)
        source = {"kind": "builtin", "revision": None}
    elif os.path.isdir(os.path.expanduser(model)):
        folder = os.path.expanduser(model)
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            raise ModelLoadError(f"{folder!r} is a folder but holds no model_index.json, so it is not a saved "
                                 "diffusers pipeline (write one with FluxPipeline.save_pretrained).")
        pipe = FluxPipeline.from_pretrained(folder, torch_dtype=torch_dtype, local_files_only=True)
        source = {"kind": "local", "revision": None}
    elif _looks_like_path(model):
        raise ModelLoadError(f"no such folder: {model!r}. " + _hub_help(DEFAULT_MODEL_ID))
    elif "/" not in model:
        raise ValueError(f"unknown built-in model {model!r}; built-ins are {sorted(BUILTIN_MODELS)}. "
                         "Otherwise pass a hub id 'owner/name' or an existing local folder.")
    else:
        kwargs: dict[str, Any] = {"torch_dtype": torch_dtype, "revision": revision}
        if local_files_only is not None:
            kwargs["local_files_only"] = local_files_only
        try:
            pipe = FluxPipeline.from_pretrained(model, **kwargs)
        except Exception as exc:  # OSError, HfHubHTTPError, HFValidationError (ValueError), ...
            raise ModelLoadError(f"could not load pipeline {model!r} (revision {revision!r}): "
                                 f"{type(exc).__name__}: {exc}\n" + _hub_help(model)) from exc
        source = {"kind": "hub", "revision": revision}
    for name in _COMPONENTS:
        component = getattr(pipe, name, None)
        if component is not None:
            component.eval()
    if torch_dtype is not None:
        pipe = pipe.to(device=device, dtype=torch_dtype)
    else:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe._atlas_source = source  # read back by describe_pipeline
    return pipe


def recommended_settings(model: str) -> dict[str, Any]:
    """Generation settings (height, width, num_inference_steps, guidance_scale,
    max_sequence_length) for `model`: the built-in's own dict, else `FLUX_SCHNELL_RECOMMENDED`.
    Returns a fresh copy the caller may modify."""
    if model in BUILTIN_MODELS:
        return dict(BUILTIN_MODELS[model][1])
    return dict(FLUX_SCHNELL_RECOMMENDED)


def _commit_hash(pipe: FluxPipeline, requested: str | None) -> str | None:
    """The hub commit the weights came from: a 40-hex `revision` as requested, else the
    `snapshots/<hash>` part of a component's `_name_or_path`; None if unknown."""
    if requested and re.fullmatch(r"[0-9a-f]{40}", requested):
        return requested
    for name in _COMPONENTS:
        component = getattr(pipe, name, None)
        path = getattr(getattr(component, "config", None), "_name_or_path", None) or ""
        match = _SNAPSHOT_RE.search(str(path))
        if match:
            return match.group(1)
    return requested


def describe_pipeline(pipe: FluxPipeline, model: str) -> dict[str, Any]:
    """Provenance and shape facts of a loaded pipeline, for run records (JSON-serialisable).

    Keys: model (as given), name_or_path (`pipe.config._name_or_path`, None for built-ins),
    source ("builtin" | "local" | "hub"; None if not loaded by `load_pipeline` and `model` is no
    built-in name), revision
    (hub commit hash when known from the cache snapshot path or a hash revision, else the
    requested revision or None), n_double_blocks, n_single_blocks, d_model (transformer
    inner_dim = heads x head_dim), vae_scale_factor, text_max_length (tokenizer_2
    model_max_length), dtype (of the transformer, e.g. "torch.bfloat16"), device.
    """
    transformer = pipe.transformer
    cfg = transformer.config
    source = getattr(pipe, "_atlas_source", None) or ({"kind": "builtin"} if model in BUILTIN_MODELS else {})
    path = getattr(pipe.config, "_name_or_path", None)
    if path is not None and os.path.isdir(str(path)):
        path = str(Path(path).resolve())
    tok2 = getattr(pipe, "tokenizer_2", None)
    return {
        "model": model,
        "name_or_path": path,
        "source": source.get("kind"),
        "revision": _commit_hash(pipe, source.get("revision")),
        "n_double_blocks": len(transformer.transformer_blocks),
        "n_single_blocks": len(transformer.single_transformer_blocks),
        "d_model": int(cfg.num_attention_heads * cfg.attention_head_dim),
        "vae_scale_factor": int(pipe.vae_scale_factor),
        "text_max_length": int(tok2.model_max_length) if tok2 is not None else None,
        "dtype": str(transformer.dtype),
        "device": str(transformer.device),
    }
