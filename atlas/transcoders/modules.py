"""Temporal-aware transcoders and SAEs (DifFRACT, facts sheet §1).

A ``TemporalAwareTranscoder`` maps the input of one FLUX double-stream MLP (``ff`` or
``ff_context``), ``x [..., d_model]``, to that MLP's output through a sparse code
``z [..., d_feat]``. The input is first modulated (FiLM) by a learned function of the
denoising time ``t`` (sigma in (0, 1], the value FluxPipeline passes to the transformer,
*not* multiplied by 1000)::

    e            = get_timestep_embedding(t, T)             # [B, T], order [sin, cos]
    scale, shift = mod_linear(time_mlp(e)).chunk(2, -1)     # [B, d_model] each
    x_mod        = x * (1 + scale) + shift                  # FiLM
    h            = encoder(x_mod)                           # pre-activations [..., d_feat]
    z            = relu(h)                                  # sparse code
    y_hat        = decoder(z)                               # [..., d_model]

State-dict keys and shapes match the published checkpoints exactly.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

__all__ = ["timestep_embedding", "TemporalAwareTranscoder", "TemporalAwareSAE"]


def _as_timesteps(t) -> torch.Tensor:
    """Turn ``t`` (float, 0-d or [B] tensor, or sequence) into a [B] tensor; validate range."""
    tt = t if isinstance(t, torch.Tensor) else torch.as_tensor(t, dtype=torch.float32)
    if tt.ndim == 0:
        tt = tt.reshape(1)
    if tt.ndim != 1 or tt.numel() == 0:
        raise ValueError(f"t must be a scalar or a non-empty 1-d tensor [B], got shape {tuple(tt.shape)}")
    if tt.device.type != "meta":
        bad = ~((tt >= 0) & (tt <= 1))  # also catches NaN
        if bool(bad.any()):
            raise ValueError(
                f"t must be sigma in [0, 1] (the transformer's timestep, i.e. step/1000), got "
                f"{tt[bad][:4].tolist()}; divide 0..1000 scheduler timesteps by 1000"
            )
    return tt


def timestep_embedding(t, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the denoising time, as the DifFRACT transcoders use it.

    Wraps ``diffusers.models.embeddings.get_timestep_embedding`` with flip_sin_to_cos=False
    (order [sin, cos]), downscale_freq_shift=1, scale=1, max_period=10000
    (DifFRACT, facts sheet §1): with ``half = dim // 2``,
    ``freq_k = exp(-ln(10000) * k / (half - 1))`` and ``emb = [sin(t*freq), cos(t*freq)]``.

    Args:
        t: sigma in [0, 1] (unitless; NOT multiplied by 1000): a python float, a 0-d tensor
            or a [B] tensor. Tensors keep their device.
        dim: embedding size T.

    Returns:
        float32 tensor [B, dim] (B = 1 for a scalar t).

    Raises:
        ValueError: t has more than one dimension, is empty, or lies outside [0, 1].
    """
    tt = _as_timesteps(t)
    return get_timestep_embedding(
        tt, dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1, max_period=10000
    )


def _default_linear_init_(lin: nn.Linear, generator: torch.Generator | None) -> None:
    """nn.Linear's default init (kaiming-uniform a=sqrt(5), uniform bias), with a generator."""
    nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=generator)
    if lin.bias is not None:
        bound = 1.0 / math.sqrt(lin.in_features) if lin.in_features > 0 else 0.0
        nn.init.uniform_(lin.bias, -bound, bound, generator=generator)


class TemporalAwareTranscoder(nn.Module):
    """Timestep-conditioned (FiLM) transcoder: MLP input -> MLP output (DifFRACT, facts §1).

    Args:
        d_model: residual width (3072 for FLUX.1).
        expansion_factor: d_feat = d_model * expansion_factor (16 -> 49152 features).
        time_embed_dim: T, the sinusoidal time-embedding size (256).

    Submodules (state-dict keys as published): ``time_mlp`` (Linear(T,T), SiLU, Linear(T,T),
    SiLU), ``mod_linear`` Linear(T, 2*d_model), ``encoder`` Linear(d_model, d_feat),
    ``decoder`` Linear(d_feat, d_model). Full size: ~303.7M parameters, 1.2 GB in fp32.
    The constructor only allocates parameters, so it is cheap under ``torch.device("meta")``.
    """

    role = "transcoder"

    def __init__(self, d_model: int = 3072, expansion_factor: int = 16, time_embed_dim: int = 256):
        super().__init__()
        self.d_model = int(d_model)
        self.expansion_factor = int(expansion_factor)
        self.d_feat = self.d_model * self.expansion_factor
        self.time_embed_dim = T = int(time_embed_dim)
        self.time_mlp = nn.Sequential(nn.Linear(T, T), nn.SiLU(), nn.Linear(T, T), nn.SiLU())
        self.mod_linear = nn.Linear(T, 2 * self.d_model)
        self.encoder = nn.Linear(self.d_model, self.d_feat)
        self.decoder = nn.Linear(self.d_feat, self.d_model)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_feat={self.d_feat}, T={self.time_embed_dim}, role={self.role!r}"

    def modulation(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """FiLM parameters for time ``t`` (DifFRACT, facts sheet §1).

        ``scale, shift = mod_linear(time_mlp(timestep_embedding(t, T))).chunk(2, -1)``,
        scale first.

        Args:
            t: sigma in [0, 1] (not x1000): float, 0-d tensor or [B] tensor.

        Returns:
            (scale, shift), each [B, d_model] in the module's dtype and device (B = 1 for scalar t).

        Raises:
            ValueError: bad t shape or range (see ``timestep_embedding``).
        """
        w = self.mod_linear.weight
        tt = _as_timesteps(t)
        e = timestep_embedding(tt.to(w.device), self.time_embed_dim).to(w.dtype)
        scale, shift = self.mod_linear(self.time_mlp(e)).chunk(2, dim=-1)
        return scale, shift

    def film(self, x: torch.Tensor, t) -> torch.Tensor:
        """Time-modulated input ``x_mod = x * (1 + scale) + shift`` (DifFRACT, facts sheet §1).

        Args:
            x: MLP input [..., d_model] (module dtype). With a [B] t (B > 1), x must be
                [B, ..., d_model] and scale/shift are broadcast over the middle dims
                (e.g. x [B, S, d_model]); with a scalar t they broadcast over everything.
            t: sigma in [0, 1] (not x1000): float, 0-d tensor or [B] tensor.

        Returns:
            x_mod, same shape as x.

        Raises:
            ValueError: x's last dim != d_model, or t has B > 1 entries and x's leading
                dim is not B.
        """
        if x.ndim == 0 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have last dim d_model={self.d_model}, got shape {tuple(x.shape)}"
            )
        scale, shift = self.modulation(t)
        B = scale.shape[0]
        if B == 1:
            scale, shift = scale[0], shift[0]
        else:
            if x.ndim < 2 or x.shape[0] != B:
                raise ValueError(
                    f"t has {B} entries, so x must have leading dim {B} ([B, ..., d_model]); "
                    f"got x shape {tuple(x.shape)}"
                )
            shape = (B,) + (1,) * (x.ndim - 2) + (self.d_model,)
            scale, shift = scale.reshape(shape), shift.reshape(shape)
        return x * (1 + scale) + shift

    def preactivations(self, x: torch.Tensor, t) -> torch.Tensor:
        """Feature pre-activations ``h = encoder(film(x, t))`` (DifFRACT, facts sheet §1).

        ``h_i = x_mod . encoder.weight[i] + encoder.bias[i]``.

        Args:
            x: MLP input [..., d_model]; t: sigma in [0, 1] (see ``film``).

        Returns:
            h [..., d_feat].

        Raises:
            ValueError: as ``film``.
        """
        return self.encoder(self.film(x, t))

    def encode(self, x: torch.Tensor, t) -> torch.Tensor:
        """Sparse code ``z = relu(h)`` (DifFRACT, facts sheet §1).

        Args:
            x: MLP input [..., d_model]; t: sigma in [0, 1] (see ``film``).

        Returns:
            z [..., d_feat], non-negative feature activations.

        Raises:
            ValueError: as ``film``.
        """
        return torch.relu(self.preactivations(x, t))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``y_hat = decoder(z) = z @ W_dec.T + b_dec`` (DifFRACT, facts sheet §1).

        Args:
            z: feature activations [..., d_feat].

        Returns:
            y_hat [..., d_model], the predicted MLP output (before the block's gate).

        Raises:
            RuntimeError: (from torch) z's last dim != d_feat.
        """
        return self.decoder(z)

    def forward(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Full pass: ``(y_hat, z)`` with ``z = relu(encoder(film(x, t)))``, ``y_hat = decoder(z)``.

        Source: DifFRACT (facts sheet §1).

        Args:
            x: MLP input [..., d_model]; t: sigma in [0, 1] (see ``film``).

        Returns:
            y_hat [..., d_model], z [..., d_feat].

        Raises:
            ValueError: as ``film``.
        """
        z = self.encode(x, t)
        return self.decode(z), z

    @torch.no_grad()
    def normalize_decoder_(self, eps: float = 1e-8) -> "TemporalAwareTranscoder":
        """Renormalise every decoder column ``decoder.weight[:, i]`` to unit L2 norm, in place.

        Source: DifFRACT training recipe (facts sheet §1): done at init and after every
        optimiser step. Columns with norm < eps are divided by eps (left near zero).

        Returns:
            self.
        """
        w = self.decoder.weight  # [d_model, d_feat]
        w.div_(w.norm(dim=0, keepdim=True).clamp_min(eps))
        return self

    @torch.no_grad()
    def init_recipe_(self, generator: torch.Generator | None = None) -> "TemporalAwareTranscoder":
        """The paper's initialisation (DifFRACT training recipe, facts sheet §1), in place.

        time_mlp: nn.Linear default init; decoder.weight: nn.Linear default (kaiming-uniform)
        draw, then columns normalised to unit L2 norm; decoder.bias = 0;
        encoder.weight = decoder.weight.T (a copy); encoder.bias = 0; mod_linear weight and
        bias = 0 so FiLM starts as the identity. All random draws use ``generator`` (on the
        parameters' device), so the result is deterministic for a seeded generator.

        Returns:
            self.
        """
        for lin in (self.time_mlp[0], self.time_mlp[2]):
            _default_linear_init_(lin, generator)
        nn.init.kaiming_uniform_(self.decoder.weight, a=math.sqrt(5), generator=generator)
        self.normalize_decoder_()
        self.decoder.bias.zero_()
        self.encoder.weight.copy_(self.decoder.weight.T)
        self.encoder.bias.zero_()
        self.mod_linear.weight.zero_()
        self.mod_linear.bias.zero_()
        return self


class TemporalAwareSAE(TemporalAwareTranscoder):
    """Timestep-conditioned SAE: MLP output -> MLP output (DifFRACT, facts sheet §1).

    Identical architecture, state dict and formulas to ``TemporalAwareTranscoder``; only
    what x is differs (x = the MLP's output [..., d_model], reconstructed as y_hat).
    """

    role = "sae"
