"""A bounded, resumable shuffling buffer of MLP activations harvested from fresh generations.

The published DifFRACT trainer keeps a 1,000,000-row pinned buffer per (layer, stream) (about
393 GB of host RAM for 16 layers, both streams). This one holds to a byte budget instead.

Layout. Per (layer, stream) key the buffer holds two *slots* of ``R`` rows each (``R`` = block
rows, a multiple of the batch size, derived from the budget by :func:`plan_buffer`). Block ``b``
is ``R`` fresh rows harvested from generations ``block_starts[b] ...`` and lives in slot
``b % 2``. Each block has a fixed random permutation ``P_b``; with ``h = R // 2``:

    phase 0 serves      P_0[:h]                       (the buffer is half full)
    phase b >= 1 serves shuffle(P_{b-1}[h:] + P_b[:h])  (R rows, R / batch_size steps)

so every harvested row is served once per pass (``reuse`` passes per phase, each in a new
shuffle; the recipe's default is one), batches mix rows of two blocks, and after phase
``b`` block ``b-1`` is fully drained: its slot is refilled with block ``b+1`` (refill when half
of the buffer is drained). All randomness comes from generators seeded by ``(seed, block)``, so
the rows the buffer serves at step ``s`` are a function of ``(seed, s, block_starts)`` alone:
a resumed run regenerates blocks ``b-1`` and ``b`` from their recorded generation cursors and
continues with exactly the batches an uninterrupted run would have seen. Nothing of the
buffer's contents is ever written to disk.

Rows. A row is (input, target, sigma): for a transcoder input = MLP input x and target = MLP
output y (before gating); for an SAE input = target = y (stored once). Text-stream rows are
only the real T5 tokens (the tokenizer's attention mask); padding never enters the buffer.
When several keys are filled from the same generations, each key takes per denoising step a
random subset of ``m`` rows, ``m`` = the fewest rows any unfilled key has at that step (the
text stream has far fewer tokens than the image stream), so all keys fill at the same pace and
the image stream is subsampled across many generations instead of taken from a few.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from atlas.model import MLPCapture, StepRecord

__all__ = ["BufferBudgetError", "BufferPlan", "plan_buffer", "Harvester", "ActivationBuffer", "derive_seed"]

_F32 = 4  # bytes per float32
_IDX = 8  # bytes per int64 index


class BufferBudgetError(ValueError):
    """The memory budget cannot hold the buffers one training step needs."""


def derive_seed(seed: int, tag: str, *parts: int | str) -> int:
    """A 63-bit seed derived from ``(seed, tag, parts)`` by sha256 (stable across runs/platforms)."""
    text = ":".join(str(p) for p in (seed, tag, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _generator(seed: int, tag: str, *parts) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(derive_seed(seed, tag, *parts))


@dataclass(frozen=True)
class BufferPlan:
    """How a byte budget is spent.

    keys: (layer, stream) buffers; d_model: row width; role: "transcoder" stores x and y per
    row, "sae" stores y once; batch_size: rows per key per training step; budget_bytes: the
    budget; block_rows: R, rows per block (two blocks per key); row_bytes: bytes of one stored
    row of one key (float32 input [+ target] + sigma); reuse: passes over each phase's rows.
    """

    keys: tuple[tuple[int, str], ...]
    d_model: int
    role: str
    batch_size: int
    budget_bytes: int
    block_rows: int
    row_bytes: int
    reuse: int = 1

    @property
    def nbytes(self) -> int:
        """Bytes the buffer allocates: 2 slots x R rows x row_bytes per key, plus one int64
        serving order of R entries shared by all keys. Always <= budget_bytes."""
        return len(self.keys) * 2 * self.block_rows * self.row_bytes + self.block_rows * _IDX

    def steps_in_phase(self, phase: int) -> int:
        """Training steps served by phase ``phase`` (phase 0 serves half a block), all passes."""
        return self.reuse * self.steps_per_pass(phase)

    def steps_per_pass(self, phase: int) -> int:
        """Steps of one pass over phase ``phase``'s rows."""
        rows = self.block_rows // 2 if phase == 0 else self.block_rows
        return rows // self.batch_size


def row_bytes(d_model: int, role: str) -> int:
    """Bytes of one stored row: float32 x and y (transcoder) or y only (SAE), plus sigma."""
    return _F32 * ((2 if role == "transcoder" else 1) * d_model + 1)


def plan_buffer(keys: Sequence[tuple[int, str]], d_model: int, role: str, batch_size: int,
                budget_bytes: int, reuse: int = 1) -> BufferPlan:
    """Largest block size R (a multiple of ``batch_size``) whose buffers fit ``budget_bytes``.

    Total bytes = n_keys * 2 * R * row_bytes + 8 * R (see ``BufferPlan.nbytes``).

    Raises:
        BufferBudgetError: the budget cannot hold two blocks of one batch each per key; the
            message gives the smallest budget that works.
    """
    keys = tuple(keys)
    rb = row_bytes(d_model, role)
    per_row = len(keys) * 2 * rb + _IDX
    rows = int(budget_bytes // per_row) // batch_size * batch_size
    if rows < batch_size:
        need = per_row * batch_size
        raise BufferBudgetError(
            f"a buffer budget of {budget_bytes / 1e9:.4g} GB is too small: {len(keys)} (layer, stream) buffers of "
            f"{rb} bytes per row need {per_row * batch_size / 1e9:.4g} GB for two blocks of one batch "
            f"({batch_size} rows) each; raise --buffer-gb to at least {need / 1e9:.4g}, or lower --batch-size "
            "or the number of layers/streams")
    return BufferPlan(keys, d_model, role, batch_size, int(budget_bytes), rows, rb, int(reuse))


class _StopHarvest(Exception):
    """Raised inside the capture callback once every key of a block is full."""


class Harvester:
    """Produces activation rows from generations ``cursor, cursor + 1, ...`` of a prompt list.

    Generation ``g`` uses prompt ``perm_e[g % n]`` (``e = g // n``, ``perm_e`` a seeded
    permutation of the n prompts, a new one every pass) and a noise seed derived from
    ``(seed, g)``, so the same cursor always gives the same generation. Generations are run
    ``gen_batch_size`` at a time with ``pipe(..., output_type="latent", **settings)`` under an
    ``MLPCapture`` of the buffer's layers and streams (all denoising steps, with sigma).
    """

    def __init__(self, pipe, prompts: Sequence[str], settings: dict, layers: Sequence[int],
                 streams: Sequence[str], gen_batch_size: int, seed: int):
        if not prompts:
            raise ValueError("Harvester needs at least one prompt")
        self.pipe, self.prompts, self.settings = pipe, list(prompts), dict(settings)
        self.layers, self.streams = list(layers), list(streams)
        self.gen_batch_size, self.seed = int(gen_batch_size), int(seed)
        self._perms: dict[int, list[int]] = {}
        self.seconds = 0.0
        self.generations = 0

    def generation(self, g: int) -> tuple[str, int]:
        """(prompt text, noise seed) of generation number ``g``."""
        n = len(self.prompts)
        epoch = g // n
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(n, generator=_generator(self.seed, "epoch", epoch)).tolist()}
        return self.prompts[self._perms[epoch][g % n]], derive_seed(self.seed, "noise", g)

    def text_mask(self, texts: list[str]) -> Tensor:
        """[B, S_txt] bool, True for real T5 tokens (padding False), as the pipeline tokenizes."""
        return self.pipe.tokenizer_2(texts, padding="max_length", max_length=self.settings["max_sequence_length"],
                                     truncation=True, return_tensors="pt")["attention_mask"].bool()

    def run(self, cursor: int, on_rows) -> int:
        """Generate from ``cursor`` until ``on_rows`` raises ``_StopHarvest``; return the next cursor.

        ``on_rows(rows)`` gets, per captured denoising step, ``{(layer, stream): (x, y, sigma)}``
        with x, y [N, d_model] and sigma [N] on the model's device and in its dtype (sigma
        float32), text padding rows already removed. Subsample there before copying to the host.
        """
        while True:
            texts, seeds = zip(*(self.generation(g) for g in range(cursor, cursor + self.gen_batch_size)))
            mask = self.text_mask(list(texts)) if "txt" in self.streams else None

            def on_step(record: StepRecord) -> None:
                rows = {}
                for (layer, stream), mlp in record.mlp.items():
                    x, y = mlp.x, mlp.y
                    sigma = record.sigma.to(x.device)[:, None].expand(x.shape[:2])
                    if stream == "txt":
                        m = mask[:, : x.shape[1]].to(x.device)
                        rows[(layer, stream)] = (x[m], y[m], sigma[m])
                    else:
                        rows[(layer, stream)] = (x.flatten(0, 1), y.flatten(0, 1), sigma.flatten())
                on_rows(rows)

            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            started = time.perf_counter()
            try:
                with MLPCapture(self.pipe.transformer, self.layers, self.streams, on_step=on_step):
                    self.pipe(prompt=list(texts), generator=generators, output_type="latent", **self.settings)
            except _StopHarvest:
                return cursor + self.gen_batch_size
            finally:
                self.seconds += time.perf_counter() - started
                self.generations += len(texts)
            cursor += self.gen_batch_size


class ActivationBuffer:
    """Fixed-capacity shuffling buffer per (layer, stream), refilled from fresh generations.

    Args:
        plan: from :func:`plan_buffer` (sizes; the allocation is exactly ``plan.nbytes``).
        harvester: where rows come from.
        seed: seeds block permutations, phase orders and row subsampling.
        pin_memory: allocate pinned host memory (for fast copies to a CUDA device).

    Storage per key: ``inp`` [2R, d_model], ``tgt`` [2R, d_model] (the same tensor for an SAE),
    ``sigma`` [2R], float32 on the CPU. ``block_starts[b]`` is the generation cursor block b
    was harvested from; ``cursor`` the next fresh generation. ``state_dict`` / ``load_state_dict``
    carry only these integers.
    """

    def __init__(self, plan: BufferPlan, harvester: Harvester, seed: int, pin_memory: bool = False):
        self.plan, self.harvester, self.seed = plan, harvester, int(seed)
        rows, d = 2 * plan.block_rows, plan.d_model
        alloc = dict(dtype=torch.float32, pin_memory=pin_memory)
        self.inp: dict[tuple[int, str], Tensor] = {}
        self.tgt: dict[tuple[int, str], Tensor] = {}
        self.sigma: dict[tuple[int, str], Tensor] = {}
        for key in plan.keys:
            self.inp[key] = torch.zeros(rows, d, **alloc)
            self.tgt[key] = torch.zeros(rows, d, **alloc) if plan.role == "transcoder" else self.inp[key]
            self.sigma[key] = torch.zeros(rows, **alloc)
        self.order = torch.zeros(plan.block_rows, dtype=torch.int64)
        self.block_starts: list[int] = []
        self.cursor = 0
        self._resident: dict[int, int] = {}  # slot -> block held
        self.rows_harvested = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffer's tensors (storage and serving order); <= plan.budget_bytes."""
        seen, total = set(), self.order.numel() * self.order.element_size()
        for group in (self.inp, self.tgt, self.sigma):
            for t in group.values():
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
        return total

    def state_dict(self) -> dict:
        """The integers needed to rebuild the buffer's contents: block_starts and cursor."""
        return {"block_starts": list(self.block_starts), "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s cursors; the contents are regenerated lazily by ``batches``."""
        self.block_starts, self.cursor = list(state["block_starts"]), int(state["cursor"])
        self._resident.clear()

    # -- filling -----------------------------------------------------------------------------
    def _fill(self, block: int) -> None:
        """Harvest block ``block`` into slot ``block % 2`` (recorded cursor if known, else fresh)."""
        slot, R = block % 2, self.plan.block_rows
        if self._resident.get(slot) == block:
            return
        fresh = block >= len(self.block_starts)
        if fresh and block != len(self.block_starts):
            raise RuntimeError(f"blocks must be harvested in order: block {block} after {len(self.block_starts)}")
        start = self.cursor if fresh else self.block_starts[block]
        filled = {key: 0 for key in self.plan.keys}
        gen = _generator(self.seed, "subsample", block)
        base = slot * R

        def on_rows(rows: dict) -> None:
            todo = [k for k in self.plan.keys if filled[k] < R]
            m = min(len(rows[k][2]) for k in todo)
            for key in todo:
                x, y, sigma = rows[key]
                take = min(R - filled[key], m)
                sel = torch.randperm(len(sigma), generator=gen)[:take].to(sigma.device)
                lo, hi = base + filled[key], base + filled[key] + take
                if self.plan.role == "transcoder":  # copy_ casts to float32 and moves to the host
                    self.inp[key][lo:hi].copy_(x[sel])
                    self.tgt[key][lo:hi].copy_(y[sel])
                else:
                    self.inp[key][lo:hi].copy_(y[sel])
                self.sigma[key][lo:hi].copy_(sigma[sel])
                filled[key] += take
            if all(filled[k] >= R for k in self.plan.keys):
                raise _StopHarvest

        end = self.harvester.run(start, on_rows)
        self.rows_harvested += R * len(self.plan.keys)
        if fresh:
            self.block_starts.append(start)
            self.cursor = end
        self._resident[slot] = block

    def _block_perm(self, block: int) -> Tensor:
        return torch.randperm(self.plan.block_rows, generator=_generator(self.seed, "block", block))

    def _set_order(self, phase: int, rep: int) -> int:
        """Fill ``self.order`` with pass ``rep`` of phase ``phase``'s serving order; return its length."""
        R, h = self.plan.block_rows, self.plan.block_rows // 2
        parts = [self._block_perm(phase)[:h] + (phase % 2) * R]
        if phase >= 1:
            parts.insert(0, self._block_perm(phase - 1)[h:] + ((phase - 1) % 2) * R)
        idx = torch.cat(parts)
        idx = idx[torch.randperm(len(idx), generator=_generator(self.seed, "phase", phase, rep))]
        self.order[: len(idx)] = idx
        return len(idx)

    # -- serving -----------------------------------------------------------------------------
    def locate(self, step: int) -> tuple[int, int]:
        """(phase, batch offset within the phase) of 0-based training step ``step``."""
        phase = 0
        while step >= (n := self.plan.steps_in_phase(phase)):
            step -= n
            phase += 1
        return phase, step

    def batches(self, start_step: int = 0) -> Iterator[dict[tuple[int, str], tuple[Tensor, Tensor, Tensor]]]:
        """Yield, for 0-based steps ``start_step, start_step + 1, ...`` (endless), one batch per key:
        ``{key: (inp [batch, d_model], tgt [batch, d_model], sigma [batch])}`` (fresh CPU tensors).

        Starting at ``start_step > 0`` (a resumed run) first regenerates the two blocks that
        step draws from, from their recorded cursors; batches are then identical to an
        uninterrupted run's.
        """
        bs = self.plan.batch_size
        phase, offset = self.locate(start_step)
        while True:
            if phase >= 1:
                self._fill(phase - 1)
            self._fill(phase)
            per_pass, rep = self.plan.steps_per_pass(phase), None
            for j in range(offset, self.plan.steps_in_phase(phase)):
                if j // per_pass != rep:
                    rep = j // per_pass
                    self._set_order(phase, rep)
                i = j % per_pass
                idx = self.order[i * bs:(i + 1) * bs]
                yield {key: (self.inp[key][idx], self.tgt[key][idx], self.sigma[key][idx]) for key in self.plan.keys}
            phase, offset = phase + 1, 0
