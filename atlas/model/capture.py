"""Capture the MLP inputs/outputs of FLUX double-stream blocks, per denoising step.

Where the data comes from (diffusers `FluxTransformerBlock.forward`, stream "img"; "txt" is the
same with `norm1_context` / `norm2_context` / `ff_context`):

    _, gate_msa, shift_mlp, scale_mlp, gate_mlp = norm1(h, emb=temb)      # gate: output [4]
    ...
    x = norm2(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]          # MLP input
    y = ff(x)                                                             # MLP output, before gating
    h = h + gate_mlp[:, None] * y

and the step's sigma is the `timestep` argument `FluxPipeline` passes to the transformer
(already t / 1000, i.e. sigma in (0, 1]). All hooks only read: they return None, so generation
is bit-for-bit the same with or without a capture.

Usage::

    with MLPCapture(pipe.transformer, layers=[0, 5], streams=("img",)) as cap:
        pipe(prompt=prompts, ...)
    cap.steps[0].mlp[(5, "img")].x   # [B, S_img, d_model]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["STREAMS", "MLPRecord", "StepRecord", "MLPCapture", "validate_layers_streams", "stream_modules"]

#: Stream name -> (AdaLN module name, MLP module name) inside `transformer.transformer_blocks[L]`.
STREAMS: dict[str, tuple[str, str]] = {"img": ("norm1", "ff"), "txt": ("norm1_context", "ff_context")}


@dataclass
class MLPRecord:
    """One MLP call of one double-stream block and stream, detached from the graph.

    x: MLP input [B, S, d_model] (what a forward hook on `ff` / `ff_context` receives).
    y: MLP output [B, S, d_model] before gating (the block adds `gate[:, None] * y`).
    gate: gate_mlp [B, d_model] (output index 4 of `norm1` / `norm1_context`).
    S is the image-token count (stream "img") or the text-token count (stream "txt").
    """

    x: Tensor
    y: Tensor
    gate: Tensor


@dataclass
class StepRecord:
    """Everything captured during one transformer forward call (one denoising step).

    step: 0-based index of the forward call since the capture was entered.
    sigma: [B] float32, the `timestep` the transformer received (FluxPipeline passes t / 1000).
    mlp: (layer, stream) -> MLPRecord for every requested layer and stream that ran.
    """

    step: int
    sigma: Tensor
    mlp: dict[tuple[int, str], MLPRecord] = field(default_factory=dict)


def validate_layers_streams(transformer: nn.Module, layers: Sequence[int],
                            streams: Sequence[str]) -> tuple[list[int], list[str]]:
    """Check layers and streams against a FluxTransformer2DModel; return them as clean lists.

    layers: indices into `transformer.transformer_blocks` (double-stream blocks, 0..n-1).
    streams: names from `STREAMS` ("img", "txt").
    Raises TypeError if `transformer` has no `transformer_blocks`, ValueError for an unknown,
    negative or non-integer layer (the message lists the available layers), an unknown stream
    (the message lists "img" and "txt"), or an empty selection.
    """
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None:
        raise TypeError(f"expected a FluxTransformer2DModel (with .transformer_blocks), got {type(transformer).__name__}")
    n = len(blocks)
    available = f"available double-stream layers: 0..{n - 1}" if n else "the model has no double-stream layers"
    clean_layers: list[int] = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
            raise ValueError(f"unknown layer {layer!r}; {available}")
        if layer not in clean_layers:
            clean_layers.append(int(layer))
    clean_streams: list[str] = []
    for stream in ([streams] if isinstance(streams, str) else streams):
        if stream not in STREAMS:
            raise ValueError(f"unknown stream {stream!r}; available streams: {sorted(STREAMS)}")
        if stream not in clean_streams:
            clean_streams.append(stream)
    if not clean_layers or not clean_streams:
        raise ValueError(f"select at least one layer and one stream ({available}; streams {sorted(STREAMS)})")
    return clean_layers, clean_streams


def stream_modules(transformer: nn.Module, layer: int, stream: str) -> tuple[nn.Module, nn.Module]:
    """(AdaLN-Zero module, MLP module) of one double-stream block and stream, e.g.
    (`transformer_blocks[L].norm1`, `transformer_blocks[L].ff`) for "img". Raises like
    `validate_layers_streams`."""
    validate_layers_streams(transformer, [layer], [stream])
    norm_name, mlp_name = STREAMS[stream]
    block = transformer.transformer_blocks[layer]
    return getattr(block, norm_name), getattr(block, mlp_name)


class MLPCapture:
    """Context manager recording MLP input/output/gate and sigma per transformer forward call.

    transformer: a FluxTransformer2DModel (e.g. `pipe.transformer`).
    layers, streams: what to record (checked by `validate_layers_streams`, ValueError if bad).
    on_step: if given, called with each completed StepRecord when the transformer's forward
        returns; the record is then dropped, so memory stays bounded. Otherwise records are
        appended to `self.steps`.
    to_device, dtype: where/how to store captured tensors (default: the model's device and
        dtype; tensors are always detached copies, never views of live activations). sigma is
        always stored as float32.

    The step counter restarts at 0 on `__enter__` and counts transformer forward calls (with
    true CFG a pipeline makes two calls per denoising step). Hooks return None (outputs are
    never modified) and are removed on `__exit__`, also when an exception propagates. Block
    calls made outside a transformer forward (no open step) are ignored.
    """

    def __init__(self, transformer: nn.Module, layers: Sequence[int], streams: Sequence[str] = ("img", "txt"),
                 on_step: Callable[[StepRecord], None] | None = None,
                 to_device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        self.layers, self.streams = validate_layers_streams(transformer, layers, streams)
        self.transformer = transformer
        self.on_step = on_step
        self.to_device = to_device
        self.dtype = dtype
        self.steps: list[StepRecord] = []
        self._handles: list[Any] = []
        self._current: StepRecord | None = None
        self._gates: dict[tuple[int, str], Tensor] = {}
        self._step = 0

    # -- storage -----------------------------------------------------------------------------
    def _store(self, t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        out = t.detach().to(device=self.to_device or t.device, dtype=dtype or self.dtype or t.dtype)
        return out.clone() if out.data_ptr() == t.data_ptr() else out

    # -- hooks -------------------------------------------------------------------------------
    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        timestep = kwargs.get("timestep", args[3] if len(args) > 3 else None)
        if timestep is None:
            raise ValueError("MLPCapture: the transformer was called without a timestep")
        sigma = self._store(torch.as_tensor(timestep).reshape(-1), dtype=torch.float32)
        self._current = StepRecord(step=self._step, sigma=sigma)
        self._gates.clear()
        self._step += 1

    def _post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        record, self._current = self._current, None
        self._gates.clear()
        if record is None:
            return
        if self.on_step is not None:
            self.on_step(record)
        else:
            self.steps.append(record)

    def _gate_hook(self, key: tuple[int, str]) -> Callable:
        def hook(module: nn.Module, args: tuple, output: tuple) -> None:
            if self._current is not None:
                self._gates[key] = output[4]
        return hook

    def _mlp_hook(self, key: tuple[int, str]) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if self._current is None:
                return
            gate = self._gates.pop(key, None)
            if gate is None:
                raise RuntimeError(f"MLPCapture: no gate_mlp seen before the MLP of layer {key[0]} stream {key[1]}")
            self._current.mlp[key] = MLPRecord(x=self._store(args[0]), y=self._store(output), gate=self._store(gate))
        return hook

    # -- context manager ---------------------------------------------------------------------
    def __enter__(self) -> "MLPCapture":
        if self._handles:
            raise RuntimeError("MLPCapture is already active")
        self.steps = []
        self._step = 0
        self._current = None
        try:
            self._handles.append(self.transformer.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
            self._handles.append(self.transformer.register_forward_hook(self._post_forward, with_kwargs=True))
            for layer in self.layers:
                for stream in self.streams:
                    norm, mlp = stream_modules(self.transformer, layer, stream)
                    self._handles.append(norm.register_forward_hook(self._gate_hook((layer, stream))))
                    self._handles.append(mlp.register_forward_hook(self._mlp_hook((layer, stream))))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._current = None
        self._gates.clear()
