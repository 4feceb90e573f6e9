"""Tests of atlas.model: the tiny pipeline, loading, and the MLP capture API (CPU, offline, fast)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atlas.model import (
    FLUX_SCHNELL_RECOMMENDED,
    TINY_RECOMMENDED,
    MLPCapture,
    ModelLoadError,
    build_tiny_pipeline,
    describe_pipeline,
    load_pipeline,
    recommended_settings,
    validate_layers_streams,
)

PROMPTS = ["a red car on a green field", "a blue circle and a yellow square", "a photo of a cat", "two dogs"]
SEEDS = [0, 1, 2, 3]
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


def generate(pipe, prompts=PROMPTS, seeds=SEEDS, **overrides):
    settings = {**TINY_RECOMMENDED, **overrides}
    generator = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompt=list(prompts), generator=generator, output_type="np", **settings).images


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def images(pipe):
    return generate(pipe)


# -- tiny pipeline ------------------------------------------------------------------------------

def test_tiny_pipeline_is_deterministic_finite_and_prompt_dependent(pipe, images):
    other = build_tiny_pipeline(seed=0)
    for name in COMPONENTS:
        a, b = getattr(pipe, name).state_dict(), getattr(other, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert not getattr(other, name).training
    again = generate(other)
    assert images.shape == (4, 32, 32, 3)
    assert np.array_equal(images, again)
    assert np.isfinite(images).all()
    assert images.std() > 0.01
    # Same seed, different prompts -> different images.
    swapped = generate(pipe, prompts=PROMPTS[::-1], seeds=SEEDS)
    for i in range(4):
        assert not np.array_equal(images[i], swapped[3 - i])
    # A different build seed gives different weights.
    w0 = pipe.transformer.transformer_blocks[0].ff.net[2].weight
    w1 = build_tiny_pipeline(seed=1).transformer.transformer_blocks[0].ff.net[2].weight
    assert not torch.equal(w0, w1)


def test_tiny_architecture(pipe):
    facts = describe_pipeline(pipe, "tiny")
    assert (facts["n_double_blocks"], facts["n_single_blocks"], facts["d_model"]) == (4, 2, 96)
    assert facts["vae_scale_factor"] == 2 and facts["text_max_length"] == 32
    assert facts["dtype"] == "torch.float32"
    assert pipe.transformer.config.in_channels == 16
    assert len(pipe.tokenizer) == len(pipe.tokenizer_2) == pipe.text_encoder.config.vocab_size
    assert pipe.text_encoder_2.config.vocab_size == len(pipe.tokenizer_2)


def test_tokenizers(pipe):
    t5, clip = pipe.tokenizer_2, pipe.tokenizer
    ids = t5("A Red circle").input_ids
    assert t5.convert_ids_to_tokens(ids) == ["a", "red", "circle", "</s>"]
    assert clip.convert_ids_to_tokens(clip("a red circle").input_ids) == ["<s>", "a", "red", "circle", "</s>"]
    # Unknown ASCII words fall back to characters, never <unk>; other symbols become <unk>.
    assert t5.convert_ids_to_tokens(t5("qzx7").input_ids) == ["q", "##z", "##x", "##7", "</s>"]
    tokens = t5.convert_ids_to_tokens(t5("a café with naïve décor ✨").input_ids)
    assert tokens.count("<unk>") == 1 and tokens[-1] == "</s>"
    # Truncation keeps the end token; the CLIP pooled vector sits on the first </s>.
    enc = clip(["red " * 50], padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    assert enc.input_ids.shape == (1, 32) and enc.input_ids[0, -1].item() == clip.eos_token_id
    enc = clip(["a red circle"], padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = pipe.text_encoder(enc.input_ids)
    assert pipe.text_encoder.config.eos_token_id == clip.eos_token_id
    assert torch.equal(out.pooler_output[0], out.last_hidden_state[0, 4])


def test_odd_prompts_run(pipe):
    prompts = ["a flibbertigibbet zorblax", "a café with naïve décor ✨", " ".join(["a red circle and"] * 20), ""]
    out = generate(pipe, prompts=prompts, seeds=[0, 1, 2, 3])
    assert out.shape == (4, 32, 32, 3) and np.isfinite(out).all()


# -- loading ------------------------------------------------------------------------------------

def test_save_and_load_round_trip(pipe, images, tmp_path):
    pipe.save_pretrained(tmp_path / "tiny")
    loaded = load_pipeline(str(tmp_path / "tiny"))
    for name in COMPONENTS:
        assert not getattr(loaded, name).training
    assert np.array_equal(generate(loaded), images)
    for prompt in PROMPTS + ["a café ✨ qzx"]:
        assert loaded.tokenizer(prompt).input_ids == pipe.tokenizer(prompt).input_ids
        assert loaded.tokenizer_2(prompt).input_ids == pipe.tokenizer_2(prompt).input_ids
    facts = describe_pipeline(loaded, str(tmp_path / "tiny"))
    assert facts["source"] == "local" and facts["name_or_path"] == str((tmp_path / "tiny").resolve())
    assert facts["revision"] is None and facts["d_model"] == 96


def test_load_builtin_and_settings():
    pipe = load_pipeline("tiny", dtype="bfloat16")
    assert pipe.transformer.dtype == torch.bfloat16
    assert describe_pipeline(pipe, "tiny")["source"] == "builtin"
    assert recommended_settings("tiny") == TINY_RECOMMENDED
    assert recommended_settings("black-forest-labs/FLUX.1-schnell") == FLUX_SCHNELL_RECOMMENDED
    assert recommended_settings("tiny") is not TINY_RECOMMENDED


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="tiny"):
        load_pipeline("no-such-builtin")
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_pipeline(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_pipeline(str(tmp_path))
    with pytest.raises(ModelLoadError, match="huggingface-cli download") as info:
        load_pipeline("atlas-tests/not-a-cached-model", local_files_only=True)
    assert "HF_HOME" in str(info.value)


# -- capture ------------------------------------------------------------------------------------

def test_capture_does_not_change_images(pipe, images):
    with MLPCapture(pipe.transformer, layers=[0, 1, 2, 3]) as cap:
        hooked = generate(pipe)
    assert np.array_equal(hooked, images)
    assert len(cap.steps) == 4
    assert not cap._handles and not pipe.transformer._forward_hooks and not pipe.transformer._forward_pre_hooks


def test_captured_data_is_right(pipe):
    transformer = pipe.transformer
    temb: dict[int, list[torch.Tensor]] = {1: [], 3: []}  # independent record of each block's temb
    handles = [transformer.transformer_blocks[layer].register_forward_pre_hook(
        lambda m, a, kw, layer=layer: temb[layer].append(kw["temb"].detach().clone()), with_kwargs=True)
        for layer in temb]
    try:
        with MLPCapture(transformer, layers=[3, 1], streams=["img", "txt"]) as cap:
            generate(pipe, prompts=PROMPTS[:2], seeds=SEEDS[:2])
    finally:
        for h in handles:
            h.remove()
    assert [s.step for s in cap.steps] == [0, 1, 2, 3]
    expected_sigmas = pipe.scheduler.sigmas[:4].float()
    assert torch.allclose(expected_sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25]))
    for i, step in enumerate(cap.steps):
        assert step.sigma.dtype == torch.float32 and torch.allclose(step.sigma, expected_sigmas[i].expand(2))
        assert set(step.mlp) == {(1, "img"), (1, "txt"), (3, "img"), (3, "txt")}
        for (layer, stream), rec in step.mlp.items():
            seq = 64 if stream == "img" else 32
            assert rec.x.shape == rec.y.shape == (2, seq, 96) and rec.gate.shape == (2, 96)
            block = transformer.transformer_blocks[layer]
            ff, norm1 = (block.ff, block.norm1) if stream == "img" else (block.ff_context, block.norm1_context)
            with torch.no_grad():
                assert torch.allclose(ff(rec.x), rec.y, atol=1e-6)
                gate = norm1.linear(norm1.silu(temb[layer][i])).chunk(6, dim=1)[5]
            assert torch.allclose(gate, rec.gate, atol=1e-6)


def test_on_step_streams_records(pipe):
    seen = []
    with MLPCapture(pipe.transformer, layers=[2], streams=("txt",), on_step=seen.append,
                    dtype=torch.float16) as cap:
        generate(pipe, prompts=PROMPTS[:1], seeds=SEEDS[:1])
    assert cap.steps == [] and [s.step for s in seen] == [0, 1, 2, 3]
    rec = seen[0].mlp[(2, "txt")]
    assert rec.x.dtype == torch.float16 and seen[0].sigma.dtype == torch.float32


def test_hooks_removed_on_exception(pipe):
    def boom(step):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with MLPCapture(pipe.transformer, layers=[0], on_step=boom):
            generate(pipe, prompts=PROMPTS[:1], seeds=SEEDS[:1])
    block = pipe.transformer.transformer_blocks[0]
    assert not block.ff._forward_hooks and not block.norm1._forward_hooks
    assert not pipe.transformer._forward_hooks and not pipe.transformer._forward_pre_hooks


def test_bad_layers_and_streams(pipe):
    with pytest.raises(ValueError, match=r"0\.\.3"):
        MLPCapture(pipe.transformer, layers=[4])
    with pytest.raises(ValueError, match=r"0\.\.3"):
        validate_layers_streams(pipe.transformer, [-1], ["img"])
    with pytest.raises(ValueError, match="'img', 'txt'"):
        MLPCapture(pipe.transformer, layers=[0], streams=["joint"])
    assert validate_layers_streams(pipe.transformer, [2, 0, 2], "img") == ([2, 0], ["img"])


def test_describe_reads_commit_from_hub_snapshot_path():
    pipe = build_tiny_pipeline()
    commit = "0123456789abcdef0123456789abcdef01234567"
    pipe.transformer.register_to_config(
        _name_or_path=f"/cache/models--black-forest-labs--FLUX.1-schnell/snapshots/{commit}/transformer")
    facts = describe_pipeline(pipe, "black-forest-labs/FLUX.1-schnell")
    assert facts["revision"] == commit and facts["name_or_path"] is None and facts["source"] is None
