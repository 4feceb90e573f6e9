"""Tests for transcoder/SAE training (atlas.transcoders.training, .buffer) and fidelity metrics
(atlas.transcoders.metrics): the loss formula, the decoder-norm invariant, the memory bound,
exact resumption, text padding, bad input, NaN handling, metrics and the two CLI commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from atlas.cli import main
from atlas.model import load_pipeline, recommended_settings
from atlas.store.catalog import connect
from atlas.transcoders import LAYOUT, TemporalAwareSAE, load_transcoders, transcoder_checksum
from atlas.transcoders.buffer import (
    ActivationBuffer,
    BufferBudgetError,
    Harvester,
    _StopHarvest,
    plan_buffer,
    row_bytes,
)
from atlas.transcoders.metrics import _Acc, evaluate_transcoders, format_metrics, set_checksum, store_metrics
from atlas.transcoders.training import (
    STATE_DIR,
    STATE_FILE,
    TrainConfig,
    TrainConfigError,
    TrainingDivergedError,
    film_forward,
    recipe_loss,
    train_transcoders,
)

PROMPTS = Path(__file__).resolve().parent.parent / "data" / "prompts" / "t2i-compbench" / "color_val.txt"
D = 96  # d_model of the tiny pipeline


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The test machine is shared: one intra-op thread avoids oversubscription slowdowns."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


def _budget_gb(n_keys: int, block_rows: int, role: str = "transcoder") -> float:
    """A budget whose plan has exactly ``block_rows`` rows per block."""
    return (n_keys * 2 * row_bytes(D, role) + 8) * block_rows / 1e9 + 1e-12


def small_cfg(out, **kw) -> TrainConfig:
    """A configuration that trains in about a second on the tiny pipeline."""
    base = dict(prompts=str(PROMPTS), out=str(out), model="tiny", device="cpu", layers=[0], streams=["img", "txt"],
                expansion_factor=2, time_embed_dim=8, batch_size=16, lr=1e-3, steps=9, seed=3,
                buffer_gb=_budget_gb(2, 32), gen_batch_size=2, checkpoint_every=4, evaluate=False)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------ the loss
def test_recipe_loss_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    y, y_hat = torch.randn(50, 7, generator=g), torch.randn(50, 7, generator=g)
    z = torch.relu(torch.randn(50, 20, generator=g))
    loss, fvu, sparsity = recipe_loss(y, y_hat, z, l1=0.37)
    Y, Yh, Z = (t.double().numpy() for t in (y, y_hat, z))
    mse = ((Y - Yh) ** 2).sum(1).mean()
    var = ((Y - Y.mean(0)) ** 2).mean(0).sum()  # population variance per dim, summed
    expected_fvu = mse / (var + 1e-6)
    expected_l1 = np.abs(Z).sum(1).mean()
    assert fvu.item() == pytest.approx(expected_fvu, rel=1e-5)
    assert sparsity.item() == pytest.approx(expected_l1, rel=1e-5)
    assert loss.item() == pytest.approx(expected_fvu + 0.37 * expected_l1, rel=1e-5)


def test_film_forward_equals_module_forward():
    from atlas.transcoders import TemporalAwareTranscoder

    tc = TemporalAwareTranscoder(12, 3, 8)
    with torch.no_grad():
        for p in tc.parameters():  # non-zero FiLM, so the time path matters
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([1.0, 0.75, 0.5, 0.25]).repeat(16)
    for got, want in zip(film_forward(tc, x, sigma), tc(x, sigma)):
        assert torch.allclose(got, want, atol=1e-6)


def test_metric_accumulator_fvu_matches_numpy():
    g = torch.Generator().manual_seed(1)
    acc = _Acc(5, 8)
    ys, yhs, zs = [], [], []
    for _ in range(3):  # added in pieces, like batches of an evaluation
        y, yh, z = torch.randn(40, 5, generator=g) + 2, torch.randn(40, 5, generator=g), torch.relu(torch.randn(40, 8, generator=g))
        acc.add(y, yh, z, 0.5)
        ys.append(y), yhs.append(yh), zs.append(z)
    Y, Yh, Z = (torch.cat(t).double().numpy() for t in (ys, yhs, zs))
    m = acc.metrics()
    assert m["fvu"] == pytest.approx(((Y - Yh) ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum(), rel=1e-9)
    assert m["explained_variance"] == pytest.approx(1 - m["fvu"])
    assert m["l0"] == pytest.approx((Z > 0).sum(1).mean())
    assert m["n_rows"] == 120


# ---------------------------------------------------------------------- the buffer (no pipeline)
class FakeHarvester:
    """Rows whose sigma is a unique id: 1000 * generation + row, 5 rows per key per call."""

    def __init__(self):
        self.calls = 0

    def run(self, cursor, on_rows):
        while True:
            self.calls += 1
            ids = torch.arange(5, dtype=torch.float32) + 1000 * cursor
            x = ids[:, None].expand(5, 4).clone()
            try:
                on_rows({(0, "img"): (x, -x, ids), (0, "txt"): (x, -x, ids)})
            except _StopHarvest:
                return cursor + 1
            cursor += 1


def _served(buffer, start, n):
    it = buffer.batches(start)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("reuse", [1, 3])
def test_buffer_serves_each_row_reuse_times_and_resumes_exactly(reuse):
    keys = [(0, "img"), (0, "txt")]
    plan = plan_buffer(keys, 4, "transcoder", 4, budget_bytes=(2 * 2 * row_bytes(4, "transcoder") + 8) * 16, reuse=reuse)
    assert plan.block_rows == 16
    buf = ActivationBuffer(plan, FakeHarvester(), seed=5)
    n_steps = sum(plan.steps_in_phase(p) for p in range(5))
    batches = _served(buf, 0, n_steps)
    for b in batches:  # targets stay paired with their inputs
        for inp, tgt, sigma in b.values():
            assert torch.equal(tgt, -inp) and torch.equal(inp[:, 0], sigma)
    ids = torch.cat([b[(0, "img")][2] for b in batches])
    counts = torch.unique(ids, return_counts=True)[1]
    # phases 0..4 drain block 0 (second half included in phase 1) to block 3 fully, block 4 half
    assert len(ids) == reuse * (4 * 16 + 8) and set(counts.tolist()) == {reuse}
    # a fresh buffer restored from the state at any step serves the identical remainder
    for k in (1, 3, 6, n_steps - 2):
        clone = ActivationBuffer(plan, FakeHarvester(), seed=5)
        clone.load_state_dict(buf.state_dict())
        rest = _served(clone, k, n_steps - k)
        for a, b in zip(rest, batches[k:]):
            assert all(torch.equal(a[key][2], b[key][2]) for key in keys)


def test_buffer_never_exceeds_its_byte_budget():
    keys = [(layer, s) for layer in range(4) for s in ("img", "txt")]
    for role in ("transcoder", "sae"):
        for budget in (10**6, 3 * 10**6 + 17, 5 * 10**7):
            plan = plan_buffer(keys, D, role, 64, budget)
            assert plan.nbytes <= budget
            assert budget - plan.nbytes < (len(keys) * 2 * plan.row_bytes + 8) * 64  # nothing left for one more batch
    plan = plan_buffer([(0, "img"), (0, "txt")], 4, "transcoder", 4, 10_000)
    buf = ActivationBuffer(plan, FakeHarvester(), seed=0)
    assert buf.nbytes == plan.nbytes <= 10_000
    ptrs = {k: t.data_ptr() for k, t in buf.inp.items()}
    _served(buf, 0, 40)  # many refills later: same tensors, no growth
    assert buf.nbytes == plan.nbytes and ptrs == {k: t.data_ptr() for k, t in buf.inp.items()}
    with pytest.raises(BufferBudgetError, match="too small.*at least"):
        plan_buffer(keys, D, "transcoder", 4096, 10**6)


def test_harvested_rows_exclude_text_padding(pipe):
    settings = recommended_settings("tiny")
    texts = ["a red car", "a blue bird sitting on a yellow flower next to a green apple"]
    h = Harvester(pipe, texts, settings, [1], ["img", "txt"], 2, seed=0)
    expected_txt = int(h.text_mask([h.generation(0)[0], h.generation(1)[0]]).sum())
    seen = []

    def on_rows(rows):
        seen.append({k: len(v[2]) for k, v in rows.items()})
        if len(seen) == settings["num_inference_steps"]:
            raise _StopHarvest

    assert h.run(0, on_rows) == 2
    assert expected_txt < 2 * settings["max_sequence_length"]
    assert all(s[(1, "txt")] == expected_txt and s[(1, "img")] == 2 * 64 for s in seen)


# ---------------------------------------------------------------------------- training runs
def _decoder_norms_ok(module) -> bool:
    norms = module.decoder.weight.norm(dim=0)
    return torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_training_keeps_decoder_unit_norm_and_writes_loadable_checkpoints(pipe, tmp_path):
    checked = []

    def check(step, logs):
        assert set(logs) == {"img_0", "txt_0"}
        checked.append(step)

    cfg = small_cfg(tmp_path / "tc", steps=5)
    result = train_transcoders(cfg, pipe=pipe, progress=False, callback=check)
    assert checked == [1, 2, 3, 4, 5]
    assert all(_decoder_norms_ok(m) for m in result.modules.values())
    loaded = load_transcoders(str(tmp_path / "tc"), d_model=D, expansion_factor=2, time_embed_dim=8)
    assert sorted(loaded) == ["img_0", "txt_0"]
    for key, m in loaded.items():
        assert _decoder_norms_ok(m)
        assert transcoder_checksum(m) == transcoder_checksum(result.modules[key])
    record = json.loads((result.folder / "training.json").read_text())
    assert record["config"]["steps"] == 5 and set(record["final_training_metrics"]) == {"img_0", "txt_0"}
    assert record["throughput"]["buffer_bytes"] <= record["throughput"]["buffer_budget_bytes"]
    manifest = json.loads((result.folder / "manifest.json").read_text())
    assert manifest["metadata"]["training"]["l1_img"] == cfg.l1_img


class Killed(Exception):
    pass


def test_killed_run_resumes_to_identical_weights(pipe, tmp_path):
    # R = 32, batch 16: phase 0 = 1 step, later phases 2 steps; checkpoints at 4 and 8
    full = train_transcoders(small_cfg(tmp_path / "a"), pipe=pipe, progress=False)

    def kill_at_7(step, logs):
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        train_transcoders(small_cfg(tmp_path / "b"), pipe=pipe, progress=False, callback=kill_at_7)
    state = torch.load(tmp_path / "b" / LAYOUT["transcoder"][0] / STATE_DIR / STATE_FILE, weights_only=False)
    assert state["step"] == 4  # mid-phase: blocks 1 and 2 must be regenerated on resume
    resumed = train_transcoders(small_cfg(tmp_path / "b"), pipe=pipe, progress=False)
    assert resumed.resumed_from == 4
    for key, m in full.modules.items():
        for name, t in m.state_dict().items():
            assert torch.equal(t, resumed.modules[key].state_dict()[name]), (key, name)
    # a rerun of a finished configuration trains nothing more and keeps the weights
    again = train_transcoders(small_cfg(tmp_path / "b"), pipe=pipe, progress=False)
    assert again.throughput["steps_run"] == 0
    assert transcoder_checksum(again.modules["img_0"]) == transcoder_checksum(full.modules["img_0"])
    # another configuration in the same folder is refused, with the differing field named
    with pytest.raises(TrainConfigError, match="lr"):
        train_transcoders(small_cfg(tmp_path / "b", lr=5e-3), pipe=pipe, progress=False)


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(pipe, tmp_path, monkeypatch):
    from atlas.transcoders import TemporalAwareTranscoder

    created = []
    original = TemporalAwareTranscoder.init_recipe_
    monkeypatch.setattr(TemporalAwareTranscoder, "init_recipe_",
                        lambda self, generator=None: created.append(self) or original(self, generator))

    def poison(step, logs):
        if step == 2:  # after step 2's checkpoint: step 3 computes with NaN weights
            with torch.no_grad():
                created[0].encoder.weight.fill_(float("nan"))

    cfg = small_cfg(tmp_path / "nan", checkpoint_every=2, streams=["img"], buffer_gb=_budget_gb(1, 32))
    with pytest.raises(TrainingDivergedError, match=r"at step 3 \(img_0\).*step 2"):
        train_transcoders(cfg, pipe=pipe, progress=False, callback=poison)
    state = torch.load(tmp_path / "nan" / LAYOUT["transcoder"][0] / STATE_DIR / STATE_FILE, weights_only=False)
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for t in state["modules"]["img_0"].values())


@pytest.mark.parametrize("change, message", [
    (dict(layers=[0, 7]), r"unknown layer 7; available double-stream layers: 0\.\.3"),
    (dict(streams=["img", "audio"]), r"unknown stream.*audio.*\['img', 'txt'\]"),
    (dict(l1_txt=-1e-4), r"l1_txt must be a finite number >= 0"),
    (dict(buffer_gb=1e-6), r"too small.*raise --buffer-gb to at least"),
    (dict(role="clt"), r"role must be one of"),
])
def test_bad_input_fails_before_any_work(pipe, tmp_path, monkeypatch, change, message):
    def no_generation(*a, **k):
        raise AssertionError("generation started before the input was checked")

    monkeypatch.setattr(Harvester, "run", no_generation)
    out = tmp_path / "never"
    with pytest.raises(TrainConfigError, match=message):
        train_transcoders(small_cfg(out, **change), pipe=pipe, progress=False)
    assert not out.exists()


def test_cli_bad_input_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["train-transcoders", "--prompts", str(PROMPTS), "--out", str(tmp_path / "o"),
                                       "--layers", "0,9", "--no-progress"])
    assert result.exit_code == 2
    assert "unknown layer 9" in result.output and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------- metrics
def _exact_sae(d: int) -> TemporalAwareSAE:
    """relu(y) - relu(-y) = y: encoder [I; -I], decoder [I, -I] (unit columns), identity FiLM."""
    sae = TemporalAwareSAE(d, 2, 8).init_recipe_(torch.Generator().manual_seed(0))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.cat([eye, -eye]))
        sae.decoder.weight.copy_(torch.cat([eye, -eye], dim=1))
    return sae.eval()


def test_exact_sae_has_zero_fvu_and_perfect_end_to_end(pipe, tmp_path):
    modules = {"img_1": _exact_sae(D), "txt_2": _exact_sae(D)}
    texts = ["a red car", "a blue bird on a yellow flower", "a green apple"]
    result = evaluate_transcoders(pipe, modules, texts, model_id="tiny", source="exact", eval_prompts="three",
                                  batch_size=2, progress=False)
    mask = pipe.tokenizer_2(texts, padding="max_length", max_length=32, truncation=True,
                            return_tensors="pt")["attention_mask"]
    steps = recommended_settings("tiny")["num_inference_steps"]
    rows = {(r["stream"], r["step"]): r for r in result.rows}
    assert len(result.rows) == 2 * (steps + 1)
    for (stream, step), r in rows.items():
        assert r["fvu"] < 1e-9 and r["explained_variance"] > 1 - 1e-9
        assert r["n_rows"] == (int(mask.sum()) if stream == "txt" else 3 * 64) * (steps if step is None else 1)
        assert r["l0"] == pytest.approx(D, abs=0.01)  # every coordinate is either > 0 or < 0
        if step is not None:
            assert r["dead_fraction"] is None  # dead fraction is a pooled-only metric
        else:  # feature i and i + D cannot both be dead; img has enough rows for none to be
            assert r["dead_fraction"] == 0.0 if stream == "img" else 0.0 <= r["dead_fraction"] <= 0.5
    assert [rows[("img", s)]["sigma"] for s in range(steps)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    s = result.set_row
    assert s["latent_mse"] < 1e-10 and s["latent_cosine"] == pytest.approx(1.0) and s["image_psnr"] > 80
    assert s["set_checksum"] == set_checksum([transcoder_checksum(m) for m in modules.values()])
    assert json.loads(s["members"]) == ["img_1", "txt_2"]
    # stored twice: replaced, not duplicated
    store_metrics(tmp_path / "atlas", result)
    store_metrics(tmp_path / "atlas", result)
    with connect(tmp_path / "atlas", read_only=True) as con:
        assert con.execute("SELECT count(*) FROM transcoder_metrics").fetchone()[0] == len(result.rows)
        assert con.execute("SELECT count(*) FROM transcoder_set_metrics").fetchone()[0] == 1
    assert "end to end (2 MLPs replaced, 3 prompts)" in format_metrics(result)


def test_random_transcoders_are_unfaithful_end_to_end(pipe):
    from atlas.transcoders import TemporalAwareTranscoder

    tc = TemporalAwareTranscoder(D, 2, 8).init_recipe_(torch.Generator().manual_seed(0)).eval()
    result = evaluate_transcoders(pipe, {"img_0": tc}, ["a red car", "a cat"], model_id="tiny", source="random",
                                  eval_prompts="two", progress=False)
    pooled = next(r for r in result.rows if r["step"] is None)
    assert pooled["fvu"] > 1 and pooled["dead_fraction"] < 1
    assert result.set_row["latent_mse"] > 1e-4 and math.isfinite(result.set_row["image_psnr"])


def test_cli_train_then_eval_into_atlas(tmp_path):
    out, atlas_dir = tmp_path / "tc", tmp_path / "atlas"
    common = ["--no-progress"]
    r = CliRunner().invoke(main, [
        "train-transcoders", "--model", "tiny", "--prompts", str(PROMPTS), "--out", str(out), "--layers", "0",
        "--streams", "img,txt", "--role", "sae", "--expansion-factor", "2", "--time-embed-dim", "8",
        "--batch-size", "16", "--steps", "3", "--buffer-gb", str(_budget_gb(2, 32, "sae")),
        "--gen-batch-size", "2", "--eval-limit", "2", "--device", "cpu", *common])
    assert r.exit_code == 0, r.output
    assert "2 sae(s) written" in r.output and "end to end" in r.output
    r = CliRunner().invoke(main, ["eval-transcoders", "--model", "tiny", "--transcoders", str(out), "--prompts",
                                  str(PROMPTS), "--limit", "2", "--atlas", str(atlas_dir), "--device", "cpu", *common])
    assert r.exit_code == 0, r.output
    assert "FVU" in r.output and "metrics stored in" in r.output
    loaded = load_transcoders(str(out), role="sae", d_model=D, expansion_factor=2, time_embed_dim=8)
    with connect(atlas_dir, read_only=True) as con:
        got = dict(con.execute("SELECT stream, checksum FROM transcoder_metrics WHERE step IS NULL").fetchall())
        role = con.execute("SELECT DISTINCT role FROM transcoder_metrics").fetchall()
    assert got == {"img": transcoder_checksum(loaded["img_0"]), "txt": transcoder_checksum(loaded["txt_0"])}
    assert role == [("sae",)]
