"""The Local Replacement Model (LRM) of one FLUX transformer call (facts sheet §3).

For one prompt, seed and denoising step, the LRM is a re-implementation of
``FluxTransformer2DModel.forward`` (diffusers 0.42, ``transformer_flux.py``) that takes its
non-linear quantities from a first, *recording* pass and holds them fixed:

- covered MLPs (double-stream layers with a transcoder) output ``transcoder(x) + error`` with
  ``error = y_true - y_hat`` held constant;
- LayerNorm denominators (``norm1``/``norm2`` of both streams, the single-stream ``norm``,
  ``norm_out``) are frozen at their observed values, the mean subtraction stays live;
- attention patterns ``softmax(q k^T / sqrt(d_head))`` (QK-norm and RoPE included) are frozen:
  only the value/output path is live;
- AdaLN modulation (shift/scale/gate of every block, ``norm_out``'s scale/shift) is constant;
- uncovered MLPs (double-stream layers without a transcoder, and the MLP half of every
  single-stream block) output their recorded value, a constant.

With the transcoder activations also frozen (features as source nodes, as in circuit-tracer)
the map from (input embeddings, MLP outputs) to any later residual, MLP input or the output
velocity is affine. :meth:`LocalReplacementModel.run` evaluates it for a leading batch
dimension B with any choice of MLP outputs, so one code path gives the reproduction check
(``mode="replacement"``), the attribution graph's forward (gradient taps on the MLP outputs)
and the bias terms (every source set to zero).

Verified against the original transformer (``tests/test_attribution.py``): with the error terms
the LRM reproduces ``FluxTransformer2DModel`` output to a relative max-abs error <= 1e-10 in
float64 (measured ~4e-16 on the tiny model) and <= 1e-5 in float32 (measured ~2e-7).

Shapes: S_img image tokens, S_txt text tokens, S = S_txt + S_img (joint order: text first,
as FLUX concatenates), d = d_model, H heads of d_head, C output channels (packed latent).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from torch import Tensor, nn

__all__ = [
    "STREAM_ORDER", "StepInputs", "StepOutOfRange", "capture_step_inputs", "LocalReplacementModel",
    "frozen_attention", "reproduction_error",
]

#: Joint-sequence order of the two streams (FLUX concatenates text before image).
STREAM_ORDER = ("txt", "img")

# Per stream: (AdaLN-Zero module, second LayerNorm, MLP, value projection, output projection).
_MODULES = {
    "img": ("norm1", "norm2", "ff", "to_v", "to_out"),
    "txt": ("norm1_context", "norm2_context", "ff_context", "add_v_proj", "to_add_out"),
}


class StepOutOfRange(ValueError):
    """A denoising step index outside the schedule (0 .. num_inference_steps - 1)."""


@dataclass
class StepInputs:
    """The arguments FluxPipeline passes to the transformer at one denoising step (batch 1).

    hidden_states: packed noisy latents [1, S_img, C_in]; encoder_hidden_states: T5 states
    [1, S_txt, D_joint]; pooled_projections: CLIP pooled vector [1, D_pool]; timestep: [1],
    sigma in (0, 1] (the pipeline's t / 1000); img_ids [S_img, 3], txt_ids [S_txt, 3]; guidance
    [1] or None (guidance-distilled models only); step: 0-based step index.
    """

    hidden_states: Tensor
    encoder_hidden_states: Tensor
    pooled_projections: Tensor
    timestep: Tensor
    img_ids: Tensor
    txt_ids: Tensor
    guidance: Tensor | None = None
    step: int = 0

    @property
    def sigma(self) -> float:
        return float(self.timestep.reshape(-1)[0])

    def kwargs(self, dtype: torch.dtype | None = None, batch: int = 1) -> dict[str, Any]:
        """Keyword arguments for ``transformer(**kwargs)``; floating tensors cast to ``dtype``,
        batch-1 tensors repeated ``batch`` times."""
        def cast(t: Tensor | None, rep: bool = True) -> Tensor | None:
            if t is None:
                return None
            t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
            return t.expand(batch, *t.shape[1:]).contiguous() if rep and batch != 1 else t
        return {
            "hidden_states": cast(self.hidden_states), "encoder_hidden_states": cast(self.encoder_hidden_states),
            "pooled_projections": cast(self.pooled_projections), "timestep": cast(self.timestep),
            "img_ids": self.img_ids, "txt_ids": self.txt_ids, "guidance": cast(self.guidance),
            "return_dict": False,
        }


class _StopPipeline(Exception):
    pass


@torch.no_grad()
def capture_step_inputs(pipe, prompt: str, seed: int, step: int, *, height: int, width: int,
                        num_inference_steps: int, guidance_scale: float, max_sequence_length: int) -> StepInputs:
    """Run ``pipe`` on one prompt and seed up to denoising step ``step``; return that call's inputs.

    The latents come from ``torch.Generator("cpu").manual_seed(seed)`` as in ``atlas ingest``, so
    the inputs are those of the generation stored in the atlas. The pipeline is stopped as soon
    as the transformer is called for ``step`` (no further steps are run).

    Raises:
        StepOutOfRange: ``step`` is not in ``0 .. num_inference_steps - 1``.
        ValueError: the pipeline passes joint-attention kwargs (IP-adapter, LoRA scale), which
            the LRM does not model.
    """
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < num_inference_steps:
        raise StepOutOfRange(f"step {step!r} is outside the schedule: this run has {num_inference_steps} denoising "
                             f"steps (0 .. {num_inference_steps - 1})")
    seen: list[dict] = []

    def hook(module, args, kwargs):
        if len(seen) == step:
            seen.append({k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in kwargs.items()})
            raise _StopPipeline
        seen.append({})

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(prompt=[prompt], generator=[torch.Generator("cpu").manual_seed(int(seed))], output_type="latent",
             height=height, width=width, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
             max_sequence_length=max_sequence_length)
    except _StopPipeline:
        pass
    finally:
        handle.remove()
    if len(seen) <= step or not seen[step]:
        raise StepOutOfRange(f"the pipeline made only {len(seen)} transformer call(s); step {step} never ran")
    kw = seen[step]
    if kw.get("joint_attention_kwargs"):
        raise ValueError(f"joint_attention_kwargs {sorted(kw['joint_attention_kwargs'])} are not modelled by the LRM")
    return StepInputs(
        hidden_states=kw["hidden_states"], encoder_hidden_states=kw["encoder_hidden_states"],
        pooled_projections=kw["pooled_projections"], timestep=kw["timestep"].reshape(-1),
        img_ids=kw["img_ids"], txt_ids=kw["txt_ids"], guidance=kw.get("guidance"), step=step,
    )


class _FrozenAttention(torch.autograd.Function):
    """``out = softmax(q k^T * scale) @ v`` with q, k constants: gradient flows to v only.

    The pattern is recomputed in query chunks in forward and backward instead of being stored
    (it would be H x S x S per block: 2 GB for FLUX at 512x512).
    """

    @staticmethod
    def forward(ctx, v: Tensor, q: Tensor, k: Tensor, scale: float, chunk: int) -> Tensor:
        ctx.scale, ctx.chunk = scale, chunk
        if chunk >= q.shape[0]:  # small enough: keep the whole pattern for the backward passes
            p = _pattern(q, k, scale)
            ctx.save_for_backward(p)
            return torch.einsum("hqk,bkhd->bqhd", p, v)
        ctx.save_for_backward(q, k)
        parts = []
        for s in range(0, q.shape[0], chunk):
            p = _pattern(q[s:s + chunk], k, scale)                      # [H, c, S]
            parts.append(torch.einsum("hqk,bkhd->bqhd", p, v))
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if len(ctx.saved_tensors) == 1:
            return torch.einsum("hqk,bqhd->bkhd", ctx.saved_tensors[0], grad), None, None, None, None
        q, k = ctx.saved_tensors
        grad_v = None
        for s in range(0, q.shape[0], ctx.chunk):
            p = _pattern(q[s:s + ctx.chunk], k, ctx.scale)
            part = torch.einsum("hqk,bqhd->bkhd", p, grad[:, s:s + ctx.chunk])
            grad_v = part if grad_v is None else grad_v + part
        return grad_v, None, None, None, None


def _pattern(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Attention pattern ``softmax(q k^T * scale)`` [H, S_q, S_k] for q [S_q, H, dh], k [S_k, H, dh]."""
    return torch.softmax(torch.einsum("qhd,khd->hqk", q, k) * scale, dim=-1)


def frozen_attention(v: Tensor, q: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
    """Attention with a frozen pattern: ``softmax(q k^T * scale) @ v``, differentiable in v only.

    Args:
        v: values [B, S, H, d_head] (live); q, k: [S, H, d_head] after QK-norm and RoPE (constants).
        scale: softmax temperature, default ``1 / sqrt(d_head)`` (what SDPA uses in FLUX).

    Returns:
        [B, S, H, d_head]. Source: attribution-graph LRM (Ameisen et al. 2025; DifFRACT, facts §3).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    chunk = max(1, int(2 ** 24 // max(1, q.shape[1] * k.shape[0])))
    return _FrozenAttention.apply(v, q, k, scale, chunk)


def _cast_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A deep copy of ``module`` cast to ``dtype`` (diffusers' keep-in-fp32 warning silenced: the
    copy is only used by the LRM, which wants every op in ``dtype``)."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        return copy.deepcopy(module).to(dtype)
    finally:
        dlog.set_verbosity(level)


def _ln_stats(h: Tensor, norm: nn.Module) -> Tensor:
    """Frozen LayerNorm denominator ``sqrt(var(h) + eps)`` [..., S, 1] of a non-affine LayerNorm."""
    if getattr(norm, "weight", None) is not None or not isinstance(norm, nn.LayerNorm):
        raise NotImplementedError(f"the LRM expects non-affine nn.LayerNorm, got {norm!r}")
    return torch.sqrt(h.var(-1, keepdim=True, unbiased=False) + norm.eps)


def _ln(h: Tensor, sigma: Tensor) -> Tensor:
    """LayerNorm with a frozen denominator: ``(h - mean(h)) / sigma`` (mean live)."""
    return (h - h.mean(-1, keepdim=True)) / sigma


@dataclass
class _Double:
    """Frozen quantities of one double-stream block (batch dim squeezed)."""

    mods: dict[str, tuple[Tensor, ...]]     # stream -> (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) [d]
    sig1: dict[str, Tensor]                 # stream -> [S_s, 1]
    sig2: dict[str, Tensor]
    q: Tensor                               # [S, H, dh] joint, after norm + RoPE
    k: Tensor
    x: dict[str, Tensor] = field(default_factory=dict)   # MLP input [S_s, d]
    y: dict[str, Tensor] = field(default_factory=dict)   # MLP output before gating [S_s, d]


@dataclass
class _Single:
    mods: tuple[Tensor, Tensor, Tensor]     # shift, scale, gate [d]
    sig: Tensor                             # [S, 1]
    q: Tensor
    k: Tensor
    mlp_const: Tensor                       # [S, d]: proj_out's MLP half applied to the recorded MLP + bias


@dataclass
class FeatureCodes:
    """Active transcoder features of one (layer, stream): ``z[position, feature] = value > 0``."""

    positions: Tensor   # [n] long
    features: Tensor    # [n] long
    values: Tensor      # [n] activation z (attribution dtype)


class LocalReplacementModel:
    """The LRM of one transformer call; build it with :meth:`record`.

    Attributes (after ``record``):
        dtype, sigma (float), step (int); covered: sorted list of (layer, stream) with a
        transcoder; start_layer: first covered layer (input nodes are the residual streams
        entering it); h0: stream -> [S_s, d] input embeddings at ``start_layer``;
        codes: (layer, stream) -> FeatureCodes; error: (layer, stream) -> [S_s, d]
        (``y_true - y_hat``); output: [S_img, C] the recorded transformer output (velocity);
        n_tokens: stream -> S_s; transcoders: key "img_6" -> module (in ``dtype``).
    """

    def __init__(self):  # use record()
        self.blocks: dict[int, _Double] = {}
        self.singles: list[_Single] = []

    # ------------------------------------------------------------------ recording pass --
    @classmethod
    @torch.no_grad()
    def record(cls, transformer: nn.Module, transcoders: dict[str, nn.Module], inputs: StepInputs,
               dtype: torch.dtype | None = None, layers: list[int] | None = None) -> "LocalReplacementModel":
        """Run the transformer once (re-implemented op for op) and freeze what the LRM needs.

        Args:
            transformer: a FluxTransformer2DModel in eval mode.
            transcoders: "{stream}_{layer}" -> TemporalAwareTranscoder (role "transcoder"); the
                covered MLPs. Keys for layers outside ``layers`` are ignored.
            inputs: one step's inputs (batch 1), e.g. from :func:`capture_step_inputs`.
            dtype: attribution dtype (float64 for exact conservation on a CPU); the transformer
                and transcoders are deep-copied and cast when it differs from theirs.
            layers: restrict the covered layers (default: every layer with a transcoder).

        Raises:
            ValueError: no covered MLP, a transcoder that is an SAE, a batch size other than 1,
                or a transcoder key naming an unknown layer/stream.
            NotImplementedError: a LayerNorm with affine weights (not FLUX).
        """
        self = cls()
        dtype = dtype or next(transformer.parameters()).dtype
        if next(transformer.parameters()).dtype != dtype:
            transformer = _cast_copy(transformer, dtype)
        n_double = len(transformer.transformer_blocks)
        covered = []
        tcs = {}
        for key, tc in transcoders.items():
            stream, layer = key.split("_")
            layer = int(layer)
            if stream not in _MODULES or not 0 <= layer < n_double:
                raise ValueError(f"transcoder {key!r} names no double-stream MLP (layers 0..{n_double - 1}, img/txt)")
            if layers is not None and layer not in layers:
                continue
            if getattr(tc, "role", "transcoder") != "transcoder":
                raise ValueError(f"{key}: an SAE (MLP out -> out) cannot replace an MLP; the LRM needs transcoders")
            tcs[key] = tc if next(tc.parameters()).dtype == dtype else _cast_copy(tc, dtype)
            covered.append((layer, stream))
        if not covered:
            raise ValueError("no covered MLP: pass at least one transcoder for the selected layers")
        if inputs.hidden_states.shape[0] != 1:
            raise ValueError("the LRM is built for one generation (batch 1)")
        self.transformer, self.transcoders, self.dtype = transformer, tcs, dtype
        self.covered = sorted(covered, key=lambda c: (c[0], STREAM_ORDER.index(c[1])))
        self.start_layer = min(c[0] for c in covered)
        self.step, self.sigma = inputs.step, inputs.sigma
        device = next(transformer.parameters()).device
        kw = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.kwargs(dtype).items()}

        tr = transformer
        h_img = tr.x_embedder(kw["hidden_states"])
        timestep = kw["timestep"].to(h_img.dtype) * 1000
        guidance = kw["guidance"]
        if guidance is None:
            temb = tr.time_text_embed(timestep, kw["pooled_projections"])
        else:
            temb = tr.time_text_embed(timestep, guidance.to(h_img.dtype) * 1000, kw["pooled_projections"])
        h_txt = tr.context_embedder(kw["encoder_hidden_states"])
        rope = tr.pos_embed(torch.cat((kw["txt_ids"], kw["img_ids"]), dim=0))
        self.n_tokens = {"txt": h_txt.shape[1], "img": h_img.shape[1]}
        self.h0 = {}
        for layer, block in enumerate(tr.transformer_blocks):
            if layer == self.start_layer:
                self.h0 = {"img": h_img[0].clone(), "txt": h_txt[0].clone()}
            h_img, h_txt, rec = self._record_double(block, h_img, h_txt, temb, rope)
            if layer >= self.start_layer:
                self.blocks[layer] = rec
        for block in tr.single_transformer_blocks:
            h_img, h_txt, rec = self._record_single(block, h_img, h_txt, temb, rope)
            self.singles.append(rec)
        norm_out = tr.norm_out
        emb = norm_out.linear(norm_out.silu(temb).to(h_img.dtype))
        scale, shift = torch.chunk(emb, 2, dim=1)
        self.final = (_ln_stats(h_img, norm_out.norm)[0], scale[0], shift[0])
        self.output = tr.proj_out(_ln(h_img, self.final[0]) * (1 + scale[:, None]) + shift[:, None])[0]

        self.codes, self.error = {}, {}
        for layer, stream in self.covered:
            tc = tcs[f"{stream}_{layer}"]
            x, y = self.blocks[layer].x[stream], self.blocks[layer].y[stream]
            z = tc.encode(x, self.sigma)
            pos, feat = (z > 0).nonzero(as_tuple=True)
            self.codes[(layer, stream)] = FeatureCodes(pos, feat, z[pos, feat])
            self.error[(layer, stream)] = y - tc.decode(z)
        return self

    def _record_double(self, block, h_img, h_txt, temb, rope):
        mods, sig1, normed = {}, {}, {}
        for stream, h in (("img", h_img), ("txt", h_txt)):
            norm1 = getattr(block, _MODULES[stream][0])
            emb = norm1.linear(norm1.silu(temb))
            mods[stream] = tuple(m[0] for m in emb.chunk(6, dim=1))
            sig1[stream] = _ln_stats(h, norm1.norm)
            shift_msa, scale_msa = mods[stream][0], mods[stream][1]
            normed[stream] = _ln(h, sig1[stream]) * (1 + scale_msa) + shift_msa
        attn = block.attn
        dh = attn.head_dim
        q = attn.norm_q(attn.to_q(normed["img"]).unflatten(-1, (-1, dh)))
        k = attn.norm_k(attn.to_k(normed["img"]).unflatten(-1, (-1, dh)))
        eq = attn.norm_added_q(attn.add_q_proj(normed["txt"]).unflatten(-1, (-1, dh)))
        ek = attn.norm_added_k(attn.add_k_proj(normed["txt"]).unflatten(-1, (-1, dh)))
        q = apply_rotary_emb(torch.cat([eq, q], dim=1), rope, sequence_dim=1)[0]
        k = apply_rotary_emb(torch.cat([ek, k], dim=1), rope, sequence_dim=1)[0]
        rec = _Double(mods=mods, sig1={s: v[0] for s, v in sig1.items()}, sig2={}, q=q, k=k)
        h = {"img": h_img, "txt": h_txt}
        attn_out = self._attention(block, rec, normed["img"], normed["txt"])
        for stream in ("img", "txt"):
            _, gate_msa, shift_mlp, scale_mlp, gate_mlp = rec.mods[stream][1:]
            hs = h[stream] + gate_msa * attn_out[stream]
            norm2 = getattr(block, _MODULES[stream][1])
            sig2 = _ln_stats(hs, norm2)
            x = _ln(hs, sig2) * (1 + scale_mlp) + shift_mlp
            y = getattr(block, _MODULES[stream][2])(x)
            rec.sig2[stream], rec.x[stream], rec.y[stream] = sig2[0], x[0], y[0]
            h[stream] = hs + gate_mlp * y
        return h["img"], h["txt"], rec

    def _record_single(self, block, h_img, h_txt, temb, rope):
        h = torch.cat([h_txt, h_img], dim=1)
        emb = block.norm.linear(block.norm.silu(temb))
        shift, scale, gate = (m[0] for m in emb.chunk(3, dim=1))
        sig = _ln_stats(h, block.norm.norm)
        n = _ln(h, sig) * (1 + scale) + shift
        mlp_hidden = block.act_mlp(block.proj_mlp(n))
        attn = block.attn
        dh = attn.head_dim
        q = apply_rotary_emb(attn.norm_q(attn.to_q(n).unflatten(-1, (-1, dh))), rope, sequence_dim=1)[0]
        k = apply_rotary_emb(attn.norm_k(attn.to_k(n).unflatten(-1, (-1, dh))), rope, sequence_dim=1)[0]
        d = h.shape[-1]
        w = block.proj_out.weight
        mlp_const = F.linear(mlp_hidden, w[:, d:]) + block.proj_out.bias
        rec = _Single(mods=(shift, scale, gate), sig=sig[0], q=q, k=k, mlp_const=mlp_const[0])
        h = self._single_step(block, rec, h)
        n_txt = h_txt.shape[1]
        return h[:, n_txt:], h[:, :n_txt], rec

    # ------------------------------------------------------------------ linear forward --
    def _attention(self, block, rec: _Double, n_img: Tensor, n_txt: Tensor) -> dict[str, Tensor]:
        attn = block.attn
        v = torch.cat([attn.add_v_proj(n_txt), attn.to_v(n_img)], dim=1).unflatten(-1, (-1, attn.head_dim))
        o = frozen_attention(v, rec.q, rec.k).flatten(2, 3)
        n = n_txt.shape[1]
        return {"img": attn.to_out[0](o[:, n:]), "txt": attn.to_add_out(o[:, :n])}

    def _single_step(self, block, rec: _Single, h: Tensor) -> Tensor:
        shift, scale, gate = rec.mods
        n = _ln(h, rec.sig) * (1 + scale) + shift
        attn = block.attn
        v = attn.to_v(n).unflatten(-1, (-1, attn.head_dim))
        o = frozen_attention(v, rec.q, rec.k).flatten(2, 3)
        d = h.shape[-1]
        return h + gate * (F.linear(o, block.proj_out.weight[:, :d]) + rec.mlp_const)

    def run(self, h_img: Tensor, h_txt: Tensor, mlp: Callable[[int, str, Tensor], Tensor],
            stop_layer: int | None = None) -> dict:
        """Evaluate the LRM from ``start_layer`` on (frozen norms, patterns and modulation).

        Args:
            h_img: [B, S_img, d], h_txt: [B, S_txt, d]: residual streams entering ``start_layer``
                (``self.h0`` reproduces the recorded call).
            mlp: ``mlp(layer, stream, x) -> y`` for every double-stream MLP (x: MLP input
                [B, S_s, d]; y: output before gating, [B or 1, S_s, d]). See :meth:`mlp_fn`.
            stop_layer: return right after the MLP inputs of this layer are computed (its MLPs and
                everything later are skipped; no "out" key).

        Returns:
            {(layer, stream): MLP input x [B, S_s, d] for every layer run, "out": [B, S_img, C]}.
        """
        tr = self.transformer
        sites: dict = {}
        for layer in range(self.start_layer, len(tr.transformer_blocks)):
            block, rec = tr.transformer_blocks[layer], self.blocks[layer]
            h = {"img": h_img, "txt": h_txt}
            normed = {s: _ln(h[s], rec.sig1[s]) * (1 + rec.mods[s][1]) + rec.mods[s][0] for s in h}
            attn_out = self._attention(block, rec, normed["img"], normed["txt"])
            for s in ("img", "txt"):
                _, _, gate_msa, shift_mlp, scale_mlp, _ = rec.mods[s]
                h[s] = h[s] + gate_msa * attn_out[s]
                sites[(layer, s)] = _ln(h[s], rec.sig2[s]) * (1 + scale_mlp) + shift_mlp
            if stop_layer == layer:
                return sites
            for s in ("img", "txt"):
                h[s] = h[s] + rec.mods[s][5] * mlp(layer, s, sites[(layer, s)])
            h_img, h_txt = h["img"], h["txt"]
        n_txt = h_txt.shape[1]
        h = torch.cat([h_txt, h_img], dim=1)
        for block, rec in zip(tr.single_transformer_blocks, self.singles):
            h = self._single_step(block, rec, h)
        sig, scale, shift = self.final
        sites["out"] = tr.proj_out(_ln(h[:, n_txt:], sig) * (1 + scale) + shift)
        return sites

    def mlp_fn(self, mode: str, taps: dict | None = None) -> Callable[[int, str, Tensor], Tensor]:
        """The MLP outputs of one LRM mode, for :meth:`run`.

        mode "replacement": covered MLPs output ``transcoder(x) + error`` (live encoder: the
        patched transformer); "frozen": covered MLPs output ``y_true + taps[(layer, stream)]``
        (taps: zero tensors requiring grad, the gradient hooks of attribution); "zero": covered
        MLPs output the decoder bias only (no feature, no error: the bias terms). Uncovered
        MLPs always output their recorded (constant) value.
        """
        def fn(layer: int, stream: str, x: Tensor) -> Tensor:
            y_true = self.blocks[layer].y[stream]
            if (layer, stream) not in self.error:
                return y_true
            tc = self.transcoders[f"{stream}_{layer}"]
            if mode == "replacement":
                return tc(x, self.sigma)[0] + self.error[(layer, stream)]
            if mode == "frozen":
                return y_true + taps[(layer, stream)] if taps and (layer, stream) in taps else y_true
            if mode == "zero":
                return tc.decoder.bias.expand_as(y_true)
            raise ValueError(f"unknown LRM mode {mode!r}")
        return fn

    @contextlib.contextmanager
    def frozen_parameters(self):
        """Within the block, the transformer's and transcoders' parameters do not require grad (so
        a retained attribution forward saves no activations for weight gradients); the flags are
        restored on exit."""
        params = [p for m in (self.transformer, *self.transcoders.values()) for p in m.parameters()]
        flags = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(False)
            yield
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)

    def replacement_output(self) -> Tensor:
        """Output [S_img, C] of the patched transformer (transcoders + constant errors, frozen
        norms and patterns), run from the recorded inputs. Equals :attr:`output` up to rounding."""
        with torch.no_grad():
            out = self.run(self.h0["img"][None], self.h0["txt"][None], self.mlp_fn("replacement"))["out"]
        return out[0]

    @torch.no_grad()
    def preactivation(self, layer: int, stream: str, positions: Tensor, features: Tensor) -> Tensor:
        """Transcoder pre-activations ``h = W_enc[f] . FiLM(x[p], sigma) + b_enc[f]`` [n] at the
        recorded MLP input (facts §1), for paired ``positions`` and ``features`` [n]."""
        tc = self.transcoders[f"{stream}_{layer}"]
        x = tc.film(self.blocks[layer].x[stream][positions], self.sigma)
        return (x * tc.encoder.weight[features]).sum(-1) + tc.encoder.bias[features]


@torch.no_grad()
def reproduction_error(lrm: LocalReplacementModel, transformer: nn.Module, inputs: StepInputs) -> dict[str, float]:
    """Compare the LRM with error terms against the original transformer on the same inputs.

    Returns ``{"max_abs": ..., "rel": max_abs / max|original|, "recorded_rel": ...}`` where the
    original output is ``transformer(**inputs)`` in the transformer's own dtype, compared with
    :meth:`LocalReplacementModel.replacement_output` (``rel``) and with the recording pass's
    output (``recorded_rel``).
    """
    dtype = next(transformer.parameters()).dtype
    device = next(transformer.parameters()).device
    kw = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.kwargs(dtype).items()}
    ref = transformer(**kw)[0][0].to(lrm.dtype)
    got = lrm.replacement_output().to(ref.device)
    scale = ref.abs().max().clamp_min(1e-30)
    return {"max_abs": float((got - ref).abs().max()), "rel": float((got - ref).abs().max() / scale),
            "recorded_rel": float((lrm.output.to(ref.device) - ref).abs().max() / scale)}
