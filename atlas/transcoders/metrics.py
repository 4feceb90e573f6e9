"""Fidelity metrics of transcoders / SAEs on a held-out prompt set, and storing them in an atlas.

Per (layer, stream) and denoising step, over the rows (positions) of the evaluation
generations, text padding excluded (facts sheet §1, §5 names):

    FVU (nMSE)          = sum((y - y_hat)^2) / sum((y - mean(y))^2)   (mean over the rows of the set)
    explained variance  = 1 - FVU
    L0                  = mean over rows of #{i : z_i > 0}
    dead fraction       = share of features with z_i > 0 on no row at all (pooled over steps only)

y is the MLP output (target of transcoders and SAEs alike); y_hat the module's reconstruction
from the MLP input (transcoder) or output (SAE). A pooled row (step NULL) pools all steps, so its
FVU uses the variance around the mean of all steps' rows.

End to end (one row per set): the same generations are run twice, once unchanged and once with
every covered MLP replaced by its module's y_hat (no error term; :class:`ReplaceMLPs`); reported
are the final latents' MSE (mean over elements) and cosine (mean over generations, each latent
flattened) and the decoded images' PSNR (mean over images of 10 log10(1 / MSE), pixels in [0, 1]).

Rows go to the atlas tables ``transcoder_metrics`` and ``transcoder_set_metrics`` (keyed by
:func:`atlas.transcoders.transcoder_checksum` / :func:`set_checksum`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from atlas.transcoders.checkpoints import LAYOUT, parse_key, transcoder_checksum

__all__ = ["EvalResult", "ReplaceMLPs", "evaluate_transcoders", "evaluate_folder", "set_checksum", "store_metrics",
           "format_metrics"]

_ROW_CHUNK = 4096  # rows encoded at once (bounds the [rows, d_feat] code tensor)


def set_checksum(checksums: Sequence[str]) -> str:
    """sha256 hex of the sorted member checksums joined by newlines (order-independent set id)."""
    return hashlib.sha256("\n".join(sorted(checksums)).encode()).hexdigest()


@dataclass
class EvalResult:
    """rows: ``transcoder_metrics`` rows (per key: one per step, then the pooled row, step None);
    set_row: the ``transcoder_set_metrics`` row, or None when end to end was not measured."""

    rows: list[dict] = field(default_factory=list)
    set_row: dict | None = None

    def to_json(self) -> dict:
        """JSON-friendly copy (timestamps as ISO strings)."""
        def clean(r):
            return {k: (v.isoformat() if isinstance(v, _dt.datetime) else v) for k, v in r.items()}
        return {"rows": [clean(r) for r in self.rows], "set": clean(self.set_row) if self.set_row else None}


class _Acc:
    """Sums for the metrics of one (key, step) set of rows (float64)."""

    def __init__(self, d_model: int, d_feat: int):
        self.n, self.sse, self.l0, self.sigma = 0, 0.0, 0.0, 0.0
        self.sum_y = torch.zeros(d_model, dtype=torch.float64)
        self.sum_y2 = torch.zeros(d_model, dtype=torch.float64)
        self.fired = torch.zeros(d_feat, dtype=torch.bool)

    def add(self, y: Tensor, y_hat: Tensor, z: Tensor, sigma: float) -> None:
        y64 = y.double().cpu()
        self.n += len(y)
        self.sse += float((y.double() - y_hat.double()).pow(2).sum())
        self.sum_y += y64.sum(0)
        self.sum_y2 += y64.pow(2).sum(0)
        active = z > 0
        self.l0 += float(active.sum())
        self.fired |= active.any(0).cpu()
        self.sigma += sigma * len(y)

    def merge(self, other: "_Acc") -> None:
        self.n += other.n
        self.sse += other.sse
        self.sum_y += other.sum_y
        self.sum_y2 += other.sum_y2
        self.l0 += other.l0
        self.fired |= other.fired

    def metrics(self) -> dict:
        sst = float((self.sum_y2 - self.sum_y.pow(2) / max(self.n, 1)).sum())
        fvu = self.sse / sst if sst > 0 else math.nan
        return {"fvu": fvu, "explained_variance": 1.0 - fvu, "l0": self.l0 / max(self.n, 1), "n_rows": self.n}


class ReplaceMLPs:
    """Context manager: the output of every covered MLP is replaced by its module's y_hat.

    modules: {"img_3": module} (stream img = ``transformer_blocks[L].ff``, txt = ``.ff_context``).
    A forward pre-hook on the transformer records sigma (its ``timestep`` argument, [B]); a
    forward hook on each covered MLP returns ``module(inp, sigma)[0]`` where inp is the MLP's
    input [B, S, d_model] (transcoder) or its true output (SAE), cast back to the MLP's dtype.
    No error term is added. Hooks are removed on exit, also when an exception propagates.
    """

    def __init__(self, transformer, modules: dict):
        self.transformer, self.modules = transformer, modules
        self._handles: list = []
        self._sigma: Tensor | None = None

    def _pre(self, module, args, kwargs) -> None:
        timestep = kwargs.get("timestep", args[3] if len(args) > 3 else None)
        self._sigma = torch.as_tensor(timestep).reshape(-1).float()

    def _hook(self, tc):
        def hook(module, args, output):
            p = tc.encoder.weight
            inp = output if tc.role == "sae" else args[0]
            y_hat, _ = tc(inp.to(p.device, p.dtype), self._sigma.to(p.device, p.dtype))
            return y_hat.to(output.device, output.dtype)
        return hook

    def __enter__(self) -> "ReplaceMLPs":
        from atlas.model import stream_modules

        try:
            self._handles.append(self.transformer.register_forward_pre_hook(self._pre, with_kwargs=True))
            for key, tc in self.modules.items():
                stream, layer = parse_key(key)
                mlp = stream_modules(self.transformer, layer, stream)[1]
                self._handles.append(mlp.register_forward_hook(self._hook(tc)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@torch.no_grad()
def evaluate_transcoders(pipe, modules: dict, prompts: Sequence[str], *, model_id: str, source: str,
                         eval_prompts: str, settings: dict | None = None, seed: int = 0, batch_size: int = 16,
                         end_to_end: bool = True, progress: bool = True) -> EvalResult:
    """Measure per-step and pooled fidelity of each module and the set's end-to-end fidelity.

    Args:
        pipe: a FluxPipeline; modules: {"img_0": TemporalAwareTranscoder or SAE} (any device:
            inputs are moved to each module's device).
        prompts: evaluation prompts (generation i uses noise seed ``seed + i``).
        model_id, source, eval_prompts: recorded in the rows (model, transcoder origin, a
            description of the prompt set).
        settings: generation settings (default ``recommended_settings(model_id)``).
        batch_size: generations per pipeline call (the pipeline runs where it lives).

    Returns:
        EvalResult with rows for ``transcoder_metrics`` and (if end_to_end) ``transcoder_set_metrics``.

    Raises:
        ValueError: empty ``modules`` or ``prompts``, or a key naming a layer/stream the model lacks.
    """
    from atlas.model import MLPCapture, recommended_settings, validate_layers_streams

    if not modules or not prompts:
        raise ValueError("evaluate_transcoders needs at least one module and one prompt")
    settings = dict(settings or recommended_settings(model_id))
    parsed = {key: parse_key(key) for key in modules}
    layers = sorted({layer for _, layer in parsed.values()})
    streams = sorted({stream for stream, _ in parsed.values()})
    validate_layers_streams(pipe.transformer, layers, streams)
    accs: dict[tuple[str, int], _Acc] = {}
    e2e = {"sq": 0.0, "numel": 0, "cos": [], "psnr": []}
    prompts = list(prompts)
    bar = tqdm(total=len(prompts), unit="gen", desc="evaluate", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        texts = prompts[start:start + batch_size]
        mask = pipe.tokenizer_2(texts, padding="max_length", max_length=settings["max_sequence_length"],
                                truncation=True, return_tensors="pt")["attention_mask"].bool()

        def on_step(record) -> None:
            for (layer, stream), mlp in record.mlp.items():
                key = f"{stream}_{layer}"
                if key not in modules:
                    continue
                tc = modules[key]
                p = tc.encoder.weight
                inp = mlp.y if tc.role == "sae" else mlp.x
                if stream == "txt":
                    m = mask[:, : inp.shape[1]].to(inp.device)
                    inp, y = inp[m], mlp.y[m]
                else:
                    inp, y = inp.flatten(0, 1), mlp.y.flatten(0, 1)
                sigma = float(record.sigma[0])
                acc = accs.setdefault((key, record.step), _Acc(tc.d_model, tc.d_feat))
                for lo in range(0, len(inp), _ROW_CHUNK):
                    x = inp[lo:lo + _ROW_CHUNK].to(p.device, p.dtype)
                    y_hat, z = tc(x, torch.tensor([sigma], device=p.device, dtype=p.dtype))  # one sigma per step
                    acc.add(y[lo:lo + _ROW_CHUNK].to(p.device, p.dtype), y_hat, z, sigma)

        final: dict[str, Tensor] = {}

        def keep_latents(pipeline, i, t, kwargs):
            final["latents"] = kwargs["latents"]
            return {}

        def generate():
            gens = [torch.Generator("cpu").manual_seed(seed + start + j) for j in range(len(texts))]
            images = pipe(prompt=texts, generator=gens, output_type="pt", callback_on_step_end=keep_latents,
                          callback_on_step_end_tensor_inputs=["latents"], **settings).images
            return final["latents"].float().flatten(1).cpu(), images.float().flatten(1).cpu()

        with MLPCapture(pipe.transformer, layers, streams, on_step=on_step):
            ref_latent, ref_image = generate()
        if end_to_end:
            with ReplaceMLPs(pipe.transformer, modules):
                rep_latent, rep_image = generate()
            e2e["sq"] += float((rep_latent.double() - ref_latent.double()).pow(2).sum())
            e2e["numel"] += ref_latent.numel()
            e2e["cos"] += torch.nn.functional.cosine_similarity(rep_latent.double(), ref_latent.double(), dim=1).tolist()
            img_mse = (rep_image.double() - ref_image.double()).pow(2).mean(1)
            e2e["psnr"] += [10 * math.log10(1.0 / v) if v > 0 else math.inf for v in img_mse.tolist()]
        bar.update(len(texts))
    bar.close()

    now = _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)
    result = EvalResult()
    checksums = {}
    for key, tc in modules.items():
        stream, layer = parsed[key]
        checksums[key] = checksum = transcoder_checksum(tc)
        base = {"checksum": checksum, "source": source, "layer": layer, "stream": stream, "role": tc.role,
                "d_feat": tc.d_feat, "eval_prompts": eval_prompts, "model_id": model_id, "measured_at": now}
        pooled = _Acc(tc.d_model, tc.d_feat)
        for step in sorted(s for k, s in accs if k == key):
            acc = accs[(key, step)]
            pooled.merge(acc)
            result.rows.append({**base, "step": step, "sigma": acc.sigma / max(acc.n, 1),
                                **acc.metrics(), "dead_fraction": None})
        result.rows.append({**base, "step": None, "sigma": None, **pooled.metrics(),
                            "dead_fraction": 1.0 - float(pooled.fired.double().mean())})
    if end_to_end:
        roles = sorted({tc.role for tc in modules.values()})
        result.set_row = {
            "set_checksum": set_checksum(list(checksums.values())), "source": source, "role": ",".join(roles),
            "members": json.dumps(sorted(modules, key=lambda k: (parsed[k][1], parsed[k][0]))),
            "latent_mse": e2e["sq"] / max(e2e["numel"], 1),
            "latent_cosine": sum(e2e["cos"]) / len(e2e["cos"]),
            "image_psnr": sum(e2e["psnr"]) / len(e2e["psnr"]),
            "n_prompts": len(prompts), "eval_prompts": eval_prompts, "model_id": model_id, "measured_at": now,
        }
    return result


def store_metrics(atlas_dir, result: EvalResult) -> Path:
    """Write ``result`` to the atlas at ``atlas_dir`` (created if missing), in one transaction.

    Earlier rows for the same (checksum, eval_prompts, model_id) (resp. set_checksum) are
    replaced, so re-evaluating the same modules on the same prompts does not duplicate rows.

    Returns:
        The atlas folder.

    Raises:
        AtlasError: ``atlas_dir`` is a non-empty non-atlas folder or of another schema version.
    """
    from atlas.store.catalog import connect, create_atlas, insert_rows, transaction

    atlas_dir = create_atlas(atlas_dir)
    with connect(atlas_dir) as con, transaction(con):
        for checksum in sorted({r["checksum"] for r in result.rows}):
            r0 = next(r for r in result.rows if r["checksum"] == checksum)
            con.execute("DELETE FROM transcoder_metrics WHERE checksum = ? AND eval_prompts = ? AND model_id = ?",
                        [checksum, r0["eval_prompts"], r0["model_id"]])
        insert_rows(con, "transcoder_metrics", result.rows)
        if result.set_row is not None:
            s = result.set_row
            con.execute("DELETE FROM transcoder_set_metrics WHERE set_checksum = ? AND eval_prompts = ? AND model_id = ?",
                        [s["set_checksum"], s["eval_prompts"], s["model_id"]])
            insert_rows(con, "transcoder_set_metrics", [s])
    return atlas_dir


def format_metrics(result: EvalResult) -> str:
    """A plain-text table of ``result`` (one line per key and step, 'all' = pooled) and the
    end-to-end line."""
    head = f"{'layer':>5} {'stream':>6} {'role':>10} {'step':>4} {'sigma':>6} {'FVU':>8} {'expl.var':>8} " \
           f"{'L0':>8} {'dead':>6} {'rows':>8}"
    lines = [head, "-" * len(head)]
    for r in sorted(result.rows, key=lambda r: (r["layer"], r["stream"], r["step"] is None, r["step"] or 0)):
        step = "all" if r["step"] is None else str(r["step"])
        sigma = "" if r["sigma"] is None else f"{r['sigma']:.3f}"
        dead = "" if r["dead_fraction"] is None else f"{r['dead_fraction']:.3f}"
        lines.append(f"{r['layer']:>5} {r['stream']:>6} {r['role']:>10} {step:>4} {sigma:>6} {r['fvu']:>8.4f} "
                     f"{r['explained_variance']:>8.4f} {r['l0']:>8.2f} {dead:>6} {r['n_rows']:>8}")
    if result.set_row:
        s = result.set_row
        lines.append(f"\nend to end ({len(json.loads(s['members']))} MLPs replaced, {s['n_prompts']} prompts): "
                     f"latent MSE {s['latent_mse']:.4g}, latent cosine {s['latent_cosine']:.4f}, "
                     f"image PSNR {s['image_psnr']:.2f} dB")
    return "\n".join(lines)


def _architecture(transcoders: str, role: str | None) -> tuple[str, dict]:
    """(role, {expansion_factor, time_embed_dim}) from a local (or built-in) folder's manifest.json, if any."""
    from atlas.transcoders.checkpoints import resolve_transcoders

    folder = Path(resolve_transcoders(transcoders))
    if role is None:
        present = [r for r, (prefix, _) in LAYOUT.items() if (folder / prefix).is_dir()] if folder.is_dir() else []
        role = present[0] if len(present) == 1 else "transcoder"
    manifest = folder / LAYOUT[role][0] / "manifest.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        return role, {"expansion_factor": int(data["expansion_factor"]), "time_embed_dim": int(data["time_embed_dim"])}
    return role, {}


def evaluate_folder(model: str, transcoders: str, prompts: str, *, atlas: str | None = None, role: str | None = None,
                    layers: Sequence[int] | None = None, streams: Sequence[str] = ("img", "txt"), limit: int = 64,
                    batch_size: int = 16, seed: int = 0, device: str = "cpu", dtype: str | None = None,
                    revision: str | None = None, expansion_factor: int | None = None,
                    time_embed_dim: int | None = None, progress: bool = True) -> EvalResult:
    """``atlas eval-transcoders``: load a pipeline and a transcoder set (a local folder or hub
    repo in the published layout, ours or DifFRACT's), evaluate on the first ``limit`` prompts
    of ``prompts`` and store the rows in ``atlas`` if given.

    Architecture: ``expansion_factor`` / ``time_embed_dim`` if given, else the folder's
    ``manifest.json`` (written by ``save_transcoders``), else the published 16 / 256; role:
    given, else the only layout folder present, else "transcoder". d_model is the model's.

    Raises:
        FileNotFoundError, CheckpointError: from ``load_transcoders``; PromptFileError,
        ModelLoadError, AtlasError as their stages raise them.
    """
    from atlas.ingest.prompts import read_prompts
    from atlas.model import load_pipeline, recommended_settings
    from atlas.transcoders.checkpoints import file_sha256, load_transcoders

    texts = [p.text for p in read_prompts(prompts, limit=limit).prompts]
    role, arch = _architecture(transcoders, role)
    pipe = load_pipeline(model, device=device, dtype=dtype, revision=revision)
    modules = load_transcoders(
        transcoders, layers=layers, streams=streams, d_model=int(pipe.transformer.inner_dim),
        expansion_factor=expansion_factor or arch.get("expansion_factor", 16),
        time_embed_dim=time_embed_dim or arch.get("time_embed_dim", 256), device=device, role=role)
    if not modules:
        raise FileNotFoundError(f"no {role} checkpoints found in {transcoders}")
    source = str(Path(transcoders).resolve()) if Path(transcoders).is_dir() else transcoders
    desc = f"{prompts} n={len(texts)} sha256={file_sha256(prompts)[:12]}"
    result = evaluate_transcoders(pipe, modules, texts, model_id=model, source=source, eval_prompts=desc,
                                  settings=recommended_settings(model), seed=seed, batch_size=batch_size,
                                  progress=progress)
    if atlas:
        store_metrics(atlas, result)
    return result
