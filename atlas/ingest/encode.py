"""From captured MLP activations to sparse transcoder codes (the rows of ``activations``)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from atlas.model import StepRecord
from atlas.transcoders import TemporalAwareTranscoder


def transcoder_input(tc: TemporalAwareTranscoder, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What the module encodes: the MLP input x for a transcoder, the MLP output y for an SAE."""
    return y if tc.role == "sae" else x


class SparseCodes:
    """Accumulates the nonzero codes of one batch, per (layer, stream), as numpy columns.

    ``add_step`` encodes every captured (layer, stream) of one denoising step:
    ``z = relu(encoder(FiLM(x, sigma)))`` ([B, S, d_feat]), drops text-stream padding positions
    (position >= n_tokens of that generation) and keeps entries with ``z > threshold``.
    """

    def __init__(self, transcoders: dict[str, TemporalAwareTranscoder], prompt_ids: list[int],
                 text_lengths: list[int], threshold: float = 0.0):
        self.transcoders = transcoders
        self.prompt_ids = np.asarray(prompt_ids, dtype=np.int32)
        self.text_lengths = torch.as_tensor(text_lengths)
        self.threshold = threshold
        self.columns: dict[tuple[int, str], dict[str, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))

    @torch.no_grad()
    def add_step(self, record: StepRecord) -> None:
        for (layer, stream), mlp in record.mlp.items():
            tc = self.transcoders[f"{stream}_{layer}"]
            param = tc.encoder.weight
            inp = transcoder_input(tc, mlp.x, mlp.y).to(param.device, param.dtype)
            sigma = record.sigma.to(param.device, param.dtype)
            z = tc.encode(inp, sigma)  # [B, S, d_feat]
            keep = z > self.threshold
            if stream == "txt":
                positions = torch.arange(z.shape[1], device=z.device)
                real = positions[None, :] < self.text_lengths.to(z.device)[:, None]
                keep &= real[:, :, None]
            b, s, f = keep.nonzero(as_tuple=True)
            cols = self.columns[(layer, stream)]
            cols["prompt_id"].append(self.prompt_ids[b.cpu().numpy()])
            cols["step"].append(np.full(len(b), record.step, dtype=np.int8))
            cols["sigma"].append(record.sigma[b.cpu()].float().numpy())
            cols["position"].append(s.cpu().numpy().astype(np.int16))
            cols["feature"].append(f.cpu().numpy().astype(np.int32))
            cols["value"].append(z[b, s, f].float().cpu().numpy())

    def partitions(self, batch_id: int):
        """Yield ``((layer, stream), columns)`` with concatenated numpy columns for the writer."""
        for key, cols in sorted(self.columns.items()):
            out = {name: np.concatenate(parts) for name, parts in cols.items()}
            out["batch_id"] = np.full(len(out["value"]), batch_id, dtype=np.int32)
            yield key, out


@torch.no_grad()
def calibrate_encoder_bias_(tc: TemporalAwareTranscoder, inputs: torch.Tensor, sigmas: torch.Tensor,
                            density: float) -> None:
    """Set each feature's encoder bias so it fires on about ``density`` of the given positions.

    For randomly initialised transcoders (no trained weights exist for a built-in model): with a
    zero bias half of all features fire everywhere; shifting feature i's bias to minus the
    ``1 - density`` quantile of its pre-activation over calibration data gives a sparse code.

    Args:
        inputs: [N, S, d_model] module inputs (MLP input, or output for an SAE) of N captures.
        sigmas: [N] the sigma of each capture.
        density: target fraction of positions where a feature fires, in (0, 1).
    """
    tc.encoder.bias.zero_()
    h = tc.preactivations(inputs.to(tc.encoder.weight.dtype), sigmas.to(tc.encoder.weight.dtype))
    h = h.reshape(-1, h.shape[-1]).float()
    tc.encoder.bias.copy_(-torch.quantile(h, 1.0 - density, dim=0).to(tc.encoder.bias.dtype))
