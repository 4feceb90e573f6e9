"""Train temporal-aware transcoders / SAEs on harvested FLUX activations (the DifFRACT recipe).

Recipe (facts sheet §1): rows (MLP input or output, MLP output, sigma) harvested from
generations over a prompt set at every denoising step; per (layer, stream) one module trained
with AdamW (weight decay 0) and cosine annealing to lr 0 over ``steps``; loss

    loss = sum((y - y_hat)^2, -1).mean() / (y.var(0, unbiased=False).sum() + 1e-6)   # batch FVU
           + l1[stream] * z.abs().sum(-1).mean()

with FiLM initialised to the identity, encoder = decoder^T and decoder columns renormalised to
unit norm at init and after every optimiser step. Data come from a bounded shuffling buffer
(:mod:`atlas.transcoders.buffer`) instead of the paper's 1M-row pinned buffers.

Outputs under ``out``: the modules in the published layout (``save_transcoders``: so
``load_transcoders(out, role=...)`` reads them), ``{prefix}/training.json`` (config, final
training metrics, throughput, evaluation), and ``{prefix}/.train-state/state.pt``, the resumable
checkpoint (modules, optimisers, schedulers, step, RNG, the buffer's generation cursors),
written atomically every ``checkpoint_every`` steps and at the end. Running the same
configuration again with the same ``out`` resumes from that checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from atlas.transcoders.buffer import ActivationBuffer, BufferBudgetError, Harvester, derive_seed, plan_buffer
from atlas.transcoders.checkpoints import LAYOUT, STREAMS, save_transcoders
from atlas.transcoders.modules import TemporalAwareSAE, TemporalAwareTranscoder

__all__ = ["TrainConfig", "TrainConfigError", "TrainingDivergedError", "TrainResult", "recipe_loss", "film_forward",
           "train_transcoders", "STATE_DIR", "STATE_FILE"]

STATE_DIR = ".train-state"
STATE_FILE = "state.pt"
_STATE_FORMAT = 1
_VAR_EPS = 1e-6
#: Fields that do not change the trained weights: they may differ when resuming.
#: (Which prompts are trained on is compared by content: ``train_prompts_sha256``.)
_NOT_IDENTITY = {"out", "device", "checkpoint_every", "eval_prompts", "eval_limit", "eval_batch_size", "atlas",
                 "evaluate", "prompts", "holdout"}


class TrainConfigError(ValueError):
    """A training configuration no run could use; raised before any work starts."""


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the checkpoint kept."""


@dataclass
class TrainConfig:
    """Everything a training run needs (CLI: ``atlas train-transcoders``).

    model: built-in name, local folder or hub id (``load_pipeline``); revision, dtype: of it.
    prompts: training prompt file (``read_prompts`` formats). holdout: fraction of it kept out
        of training for the final evaluation when ``eval_prompts`` is None.
    layers: double-stream block indices (None = all); streams: subset of ("img", "txt").
    role: "transcoder" (MLP input -> output) or "sae" (MLP output -> output).
    expansion_factor: d_feat / d_model; time_embed_dim: T of the sinusoidal embedding.
    l1_img, l1_txt: L1 coefficients lambda per stream (paper: 3e-4, 5e-5).
    batch_size: rows per (layer, stream) per step (paper 4096). lr: AdamW peak learning rate
        (cosine-annealed to 0 over ``steps``); weight_decay: AdamW's (paper 0).
    buffer_gb: host memory budget of all activation buffers together, in GB (1e9 bytes).
    reuse: passes over each harvested row (1 = the recipe: every row once); more passes trade
        data freshness for fewer generations (harvesting is the bottleneck on small models).
    gen_batch_size: prompts per pipeline call while harvesting.
    checkpoint_every: steps between resumable checkpoints (one is always written at the end).
    eval_prompts / eval_limit / eval_batch_size: the held-out evaluation run at the end
        (``evaluate=False`` skips it); atlas: atlas folder to store its metrics in (optional).
    device: "auto" (cuda if available), "cpu", "cuda:0", ...
    """

    prompts: str = ""
    out: str = ""
    model: str = "toy"
    revision: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    layers: list[int] | None = None
    streams: list[str] = field(default_factory=lambda: list(STREAMS))
    role: str = "transcoder"
    expansion_factor: int = 16
    time_embed_dim: int = 256
    l1_img: float = 3e-4
    l1_txt: float = 5e-5
    batch_size: int = 4096
    lr: float = 2e-4
    weight_decay: float = 0.0
    steps: int = 1000
    seed: int = 0
    buffer_gb: float = 2.0
    reuse: int = 1
    gen_batch_size: int = 64
    checkpoint_every: int = 100
    holdout: float = 0.1
    eval_prompts: str | None = None
    eval_limit: int = 64
    eval_batch_size: int = 16
    evaluate: bool = True
    atlas: str | None = None

    def validate(self) -> None:
        """Checks that need no model. Raises TrainConfigError naming the field and the value."""
        if not self.prompts:
            raise TrainConfigError("no prompt file given (--prompts FILE)")
        if not self.out:
            raise TrainConfigError("no output folder given (--out DIR)")
        streams = [self.streams] if isinstance(self.streams, str) else list(self.streams)
        bad = [s for s in streams if s not in STREAMS]
        if bad or not streams:
            raise TrainConfigError(f"unknown stream(s) {bad or streams}; available streams: {list(STREAMS)}")
        if self.role not in LAYOUT:
            raise TrainConfigError(f"role must be one of {sorted(LAYOUT)}, not {self.role!r}")
        for name in ("l1_img", "l1_txt", "weight_decay"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise TrainConfigError(f"{name} must be a finite number >= 0, got {value}")
        for name in ("expansion_factor", "batch_size", "steps", "reuse", "gen_batch_size", "checkpoint_every", "eval_limit",
                     "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise TrainConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.time_embed_dim < 4:
            raise TrainConfigError(f"time_embed_dim must be at least 4, got {self.time_embed_dim}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise TrainConfigError(f"lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.buffer_gb) and self.buffer_gb > 0):
            raise TrainConfigError(f"buffer_gb must be a finite number > 0, got {self.buffer_gb}")
        if self.eval_prompts is None and self.evaluate and not 0 < self.holdout < 1:
            raise TrainConfigError(f"holdout must be in (0, 1) when no eval prompt file is given, got {self.holdout}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        """The fields that determine the trained weights (compared when resuming)."""
        return {k: v for k, v in self.to_dict().items() if k not in _NOT_IDENTITY}


@dataclass
class TrainResult:
    """What :func:`train_transcoders` produced.

    modules: {"img_0": module} (eval mode, CPU); folder: where ``save_transcoders`` wrote them;
    final: per key training metrics averaged over the last steps (loss, fvu, l0);
    throughput: rows/s and seconds; evaluation: ``EvalResult`` or None; resumed_from: the
    step the run resumed at (0 for a fresh run).
    """

    out: Path
    folder: Path
    modules: dict
    final: dict
    throughput: dict
    evaluation: object | None
    resumed_from: int


def recipe_loss(y: torch.Tensor, y_hat: torch.Tensor, z: torch.Tensor, l1: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DifFRACT training loss (facts sheet §1) of one batch.

    ``fvu = sum((y - y_hat)^2, -1).mean() / (y.var(0, unbiased=False).sum() + 1e-6)``,
    ``sparsity = z.abs().sum(-1).mean()``, ``loss = fvu + l1 * sparsity``.

    Args:
        y: targets [N, d_model]; y_hat: reconstructions [N, d_model]; z: codes [N, d_feat];
        l1: lambda (>= 0).

    Returns:
        (loss, fvu, sparsity), 0-d tensors (loss carries the gradient).
    """
    mse = (y - y_hat).pow(2).sum(-1).mean()
    fvu = mse / (y.var(0, unbiased=False).sum() + _VAR_EPS)
    sparsity = z.abs().sum(-1).mean()
    return fvu + l1 * sparsity, fvu, sparsity


def film_forward(tc: TemporalAwareTranscoder, inp: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``tc(inp, sigma)`` for rows whose sigma takes few distinct values (a training batch mixes
    the 4 denoising steps): the time MLP runs once per distinct sigma instead of once per row.

    Same formula as ``TemporalAwareTranscoder.forward`` (facts sheet §1): ``scale, shift =
    modulation(sigma)``, ``x_mod = x * (1 + scale) + shift``, ``z = relu(encoder(x_mod))``,
    ``y_hat = decoder(z)``; equal to it up to float rounding, and about 25% faster on the tiny
    pipeline, where T = 256 exceeds d_model.

    Args:
        inp: [N, d_model] module inputs; sigma: [N] in [0, 1].

    Returns:
        (y_hat [N, d_model], z [N, d_feat]).
    """
    uniq, inverse = torch.unique(sigma, return_inverse=True)
    scale, shift = tc.modulation(uniq)
    z = torch.relu(tc.encoder(inp * (1 + scale[inverse]) + shift[inverse]))
    return tc.decoder(z), z


def _resolve_device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _split_prompts(cfg: TrainConfig):
    """(training texts, evaluation texts, description of the evaluation set)."""
    from atlas.ingest.prompts import read_prompts
    from atlas.transcoders.checkpoints import file_sha256

    texts = [p.text for p in read_prompts(cfg.prompts).prompts]
    if cfg.eval_prompts is not None:
        ev = [p.text for p in read_prompts(cfg.eval_prompts, limit=cfg.eval_limit).prompts]
        return texts, ev, f"{cfg.eval_prompts} n={len(ev)} sha256={file_sha256(cfg.eval_prompts)[:12]}"
    if not cfg.evaluate:
        return texts, [], ""
    if len(texts) < 2:
        raise TrainConfigError(f"{cfg.prompts} has {len(texts)} prompt(s): too few to hold some out for evaluation; "
                               "give --eval-prompts or --no-eval")
    n_eval = min(max(1, round(len(texts) * cfg.holdout)), len(texts) - 1)
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "holdout")))
    held = sorted(perm[:n_eval].tolist())[: cfg.eval_limit]
    train = [texts[i] for i in sorted(perm[n_eval:].tolist())]
    desc = f"{cfg.prompts} holdout {cfg.holdout} seed {cfg.seed} n={len(held)} sha256={file_sha256(cfg.prompts)[:12]}"
    return train, [texts[i] for i in held], desc


def _atomic_torch_save(obj, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _differences(a: dict, b: dict) -> str:
    return "\n".join(f"  {k}: checkpoint has {b.get(k)!r}, this run has {a.get(k)!r}"
                     for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def train_transcoders(cfg: TrainConfig, *, pipe=None, progress: bool = True,
                      callback: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train one module per (layer, stream) of ``cfg`` and save them (see the module docstring).

    Args:
        cfg: the configuration (validated here).
        pipe: an already loaded pipeline for ``cfg.model`` (else ``load_pipeline`` is called).
        progress: show a tqdm bar with loss, FVU and L0 (means over the keys).
        callback: called after every step (and its checkpoint) with ``(step, logs)``, step
            1-based, logs ``{key: {"loss", "fvu", "l0"}}``; an exception it raises stops the run
            like a kill (the last checkpoint stays).

    Returns:
        TrainResult.

    Raises:
        TrainConfigError: bad configuration: unknown stream or role, negative L1 coefficient,
            layer outside the model (lists the available ones), a buffer budget too small for
            one batch (gives the minimum), a checkpoint in ``out`` of another configuration.
            All raised before any generation, training or writing.
        AtlasError: ``cfg.atlas`` is not an atlas or of another schema version (also up front).
        PromptFileError, ModelLoadError: unreadable prompt file / model.
        TrainingDivergedError: NaN or infinite loss (names the step; the last good checkpoint
            is kept).
    """
    from atlas.model import load_pipeline, recommended_settings, validate_layers_streams

    cfg.validate()
    cfg.streams = [cfg.streams] if isinstance(cfg.streams, str) else list(cfg.streams)
    train_texts, eval_texts, eval_desc = _split_prompts(cfg)
    device = _resolve_device(cfg.device)
    if pipe is None:
        pipe = load_pipeline(cfg.model, device=device, dtype=cfg.dtype, revision=cfg.revision)
    n_blocks = len(pipe.transformer.transformer_blocks)
    layers = list(range(n_blocks)) if cfg.layers is None else list(cfg.layers)
    try:
        layers, streams = validate_layers_streams(pipe.transformer, layers, cfg.streams)
    except ValueError as e:
        raise TrainConfigError(str(e)) from e
    keys = [(layer, stream) for stream in streams for layer in layers]
    d_model = int(pipe.transformer.inner_dim)
    try:
        plan = plan_buffer(keys, d_model, cfg.role, cfg.batch_size, int(cfg.buffer_gb * 1e9), cfg.reuse)
    except BufferBudgetError as e:
        raise TrainConfigError(str(e)) from e
    out = Path(cfg.out)
    # One resumable state per role, next to its modules: a transcoder and an SAE run may share `out`.
    state_path = out / LAYOUT[cfg.role][0] / STATE_DIR / STATE_FILE
    identity = {**cfg.identity(), "layers": layers, "streams": streams, "d_model": d_model,
                "train_prompts_sha256": hashlib.sha256("\n".join(train_texts).encode()).hexdigest()}
    state = None
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("format") != _STATE_FORMAT or state.get("identity") != identity:
            raise TrainConfigError(
                f"{state_path} is a checkpoint of another training configuration:\n"
                f"{_differences(identity, state.get('identity', {}))}\nNothing was changed. Use another --out, "
                f"or delete {state_path.parent} to start this configuration from scratch.")

    if cfg.atlas:
        _check_atlas(Path(cfg.atlas))

    # -- everything checked: build -----------------------------------------------------------------
    settings = recommended_settings(cfg.model)
    cls = TemporalAwareSAE if cfg.role == "sae" else TemporalAwareTranscoder
    modules, optims, scheds = {}, {}, {}
    for layer, stream in keys:
        key = f"{stream}_{layer}"
        tc = cls(d_model, cfg.expansion_factor, cfg.time_embed_dim)
        tc.init_recipe_(torch.Generator().manual_seed(derive_seed(cfg.seed, "init", key)))
        modules[key] = tc.to(device).train()
        optims[key] = torch.optim.AdamW(tc.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheds[key] = torch.optim.lr_scheduler.CosineAnnealingLR(optims[key], T_max=cfg.steps, eta_min=0.0)
    harvester = Harvester(pipe, train_texts, settings, layers, streams, cfg.gen_batch_size, cfg.seed)
    buffer = ActivationBuffer(plan, harvester, cfg.seed, pin_memory=device.startswith("cuda"))
    recent = {key: deque(maxlen=20) for key in modules}
    start = 0
    if state is not None:
        for key, tc in modules.items():
            tc.load_state_dict(state["modules"][key])
            optims[key].load_state_dict(state["optimizers"][key])
            scheds[key].load_state_dict(state["schedulers"][key])
            recent[key].extend(state["recent"][key])
        buffer.load_state_dict(state["buffer"])
        torch.set_rng_state(state["torch_rng"])
        start = int(state["step"])

    def checkpoint(step: int) -> None:
        _atomic_torch_save({
            "format": _STATE_FORMAT, "identity": identity, "step": step,
            "modules": {k: m.state_dict() for k, m in modules.items()},
            "optimizers": {k: o.state_dict() for k, o in optims.items()},
            "schedulers": {k: s.state_dict() for k, s in scheds.items()},
            "recent": {k: list(v) for k, v in recent.items()},
            "buffer": buffer.state_dict(), "torch_rng": torch.get_rng_state(),
        }, state_path)

    l1 = {"img": cfg.l1_img, "txt": cfg.l1_txt}
    bar = tqdm(total=cfg.steps, initial=start, unit="step", desc=f"train {cfg.role}s", disable=not progress)
    t0, harvest0 = time.perf_counter(), harvester.seconds
    step = start
    batches = buffer.batches(start) if start < cfg.steps else iter(())
    try:
        for batch in batches:
            step += 1
            logs = {}
            for (layer, stream), rows in batch.items():
                key = f"{stream}_{layer}"
                logs[key] = _optimise(modules[key], optims[key], scheds[key], rows, l1[stream], device, step, key,
                                      state_path)
                recent[key].append(logs[key])
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint(step)
            bar.update(1)
            if step % 5 == 0 or step == cfg.steps:
                bar.set_postfix({m: f"{sum(v[m] for v in logs.values()) / len(logs):.4g}" for m in ("loss", "fvu", "l0")})
            if callback is not None:
                callback(step, logs)
            if step >= cfg.steps:
                break
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    harvest_s = harvester.seconds - harvest0
    trained_rows = (step - start) * cfg.batch_size * len(keys)
    throughput = {
        "steps_run": step - start, "seconds": elapsed, "harvest_seconds": harvest_s,
        "rows_per_second": trained_rows / elapsed if elapsed > 0 else None,
        "train_rows_per_second": trained_rows / (elapsed - harvest_s) if elapsed > harvest_s else None,
        "generations": harvester.generations, "buffer_bytes": buffer.nbytes, "buffer_budget_bytes": plan.budget_bytes,
        "block_rows": plan.block_rows,
    }
    for tc in modules.values():
        tc.eval()
    final = {k: {m: sum(e[m] for e in v) / len(v) for m in ("loss", "fvu", "l0")} for k, v in recent.items() if v}
    return _finish(cfg, out, modules, final, throughput, pipe, eval_texts, eval_desc, start, progress)


def _optimise(tc, optim, sched, rows, l1: float, device: str, step: int, key: str, state_path: Path) -> dict:
    """One recipe step of one module on one batch ``(inp, tgt, sigma)``; returns {loss, fvu, l0}.

    Raises TrainingDivergedError (before touching the weights) if the loss is not finite.
    """
    inp, tgt, sigma = (t.to(device, non_blocking=True) for t in rows)
    y_hat, z = film_forward(tc, inp, sigma)
    loss, fvu, _ = recipe_loss(tgt, y_hat, z, l1)
    if not torch.isfinite(loss):
        kept = (f"the last good checkpoint (step {_saved_step(state_path)}) is kept in {state_path}"
                if state_path.is_file() else "no checkpoint had been written yet")
        raise TrainingDivergedError(
            f"loss is {loss.item()} at step {step} ({key}); training stopped, {kept}. "
            "Lower --lr or the L1 coefficients, or check the activations for inf/NaN.")
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    sched.step()
    tc.normalize_decoder_()  # recipe: unit-norm decoder columns after every optimiser step
    with torch.no_grad():
        return {"loss": loss.item(), "fvu": fvu.item(), "l0": (z > 0).sum(-1).float().mean().item()}


def _check_atlas(path: Path) -> None:
    """Raise AtlasError now (not after training) if metrics could not be stored at ``path``."""
    from atlas.store.catalog import AtlasError, catalog_path, connect

    if catalog_path(path).exists():
        with connect(path, read_only=True):
            pass
    elif path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise AtlasError(f"--atlas {path} exists and is not an atlas (no atlas.duckdb); choose another folder")


def _saved_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["step"])
    except (OSError, KeyError, RuntimeError):
        return None


def _finish(cfg, out, modules, final, throughput, pipe, eval_texts, eval_desc, start, progress) -> TrainResult:
    """Save modules in the published layout, evaluate, write training.json."""
    save_transcoders(modules, out, role=cfg.role, metadata={"training": cfg.to_dict()})
    folder = out / LAYOUT[cfg.role][0]
    evaluation = None
    if cfg.evaluate and eval_texts:
        from atlas.transcoders.metrics import evaluate_transcoders, store_metrics

        evaluation = evaluate_transcoders(
            pipe, modules, eval_texts, model_id=cfg.model, source=str(out.resolve()), eval_prompts=eval_desc,
            batch_size=cfg.eval_batch_size, progress=progress)
        if cfg.atlas:
            store_metrics(cfg.atlas, evaluation)
    cpu_modules = {k: m.to("cpu") for k, m in modules.items()}
    record = {"config": cfg.to_dict(), "keys": sorted(modules), "final_training_metrics": final, "throughput": throughput,
              "resumed_from_step": start,
              "evaluation": evaluation.to_json() if evaluation is not None else None}
    text = json.dumps(record, indent=2, default=str) + "\n"
    tmp = folder / ".training.json.tmp"
    tmp.write_text(text)
    os.replace(tmp, folder / "training.json")
    return TrainResult(out, folder, cpu_modules, final, throughput, evaluation, start)
