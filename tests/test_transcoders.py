"""Tests for atlas.transcoders: architecture contract, formulas, init recipe, checkpoints."""

import json
import math
import os

import numpy as np
import pytest
import torch

from atlas.transcoders import (
    STREAMS,
    CheckpointError,
    TemporalAwareSAE,
    TemporalAwareTranscoder,
    check_state_dict,
    file_sha256,
    load_transcoders,
    parse_key,
    save_transcoders,
    timestep_embedding,
    transcoder_checksum,
)
from atlas.transcoders import checkpoints as ckpt_mod

D, EF, T = 32, 4, 16
SMALL = dict(d_model=D, expansion_factor=EF, time_embed_dim=T)


def _random(cls=TemporalAwareTranscoder, seed=0):
    torch.manual_seed(seed)
    m = cls(D, EF, T)
    with torch.no_grad():
        for p in m.parameters():  # nonzero everywhere, incl. mod_linear, so FiLM is non-trivial
            p.normal_(0, 0.3)
    return m.eval()


def _hand_embedding(t, dim):
    half = dim // 2
    exponent = -math.log(10000) * np.arange(half, dtype=np.float64) / (half - 1)
    emb = np.asarray(t, dtype=np.float64).reshape(-1, 1) * np.exp(exponent)[None, :]
    return np.concatenate([np.sin(emb), np.cos(emb)], axis=-1)


# ---------------------------------------------------------------- architecture contract
FACTS_TABLE = {  # facts sheet §1, d_model=3072, d_feat=49152, T=256
    "time_mlp.0.weight": [256, 256],
    "time_mlp.0.bias": [256],
    "time_mlp.2.weight": [256, 256],
    "time_mlp.2.bias": [256],
    "mod_linear.weight": [6144, 256],
    "mod_linear.bias": [6144],
    "encoder.weight": [49152, 3072],
    "encoder.bias": [49152],
    "decoder.weight": [3072, 49152],
    "decoder.bias": [3072],
}


def test_full_size_on_meta_matches_facts_table():
    with torch.device("meta"):
        m = TemporalAwareTranscoder(3072, 16, 256)
    sd = m.state_dict()
    assert {k: list(v.shape) for k, v in sd.items()} == FACTS_TABLE
    assert all(v.is_meta for v in sd.values())
    n = sum(p.numel() for p in m.parameters())
    # T*T+T twice, (T+1)*2d, (d+1)*d_feat, (d_feat+1)*d  = 303,752,704 ("about 303.7 M")
    assert n == 2 * (256 * 256 + 256) + 257 * 6144 + 3073 * 49152 + 49153 * 3072 == 303_752_704
    assert (m.d_model, m.expansion_factor, m.d_feat, m.time_embed_dim) == (3072, 16, 49152, 256)
    assert m.role == "transcoder" and TemporalAwareSAE.role == "sae"
    assert "d_feat=49152" in repr(m) and "T=256" in repr(m)


# ---------------------------------------------------------------- formulas
def test_timestep_embedding_matches_hand_formula_and_order():
    t = torch.tensor([1.0, 0.75, 0.5, 0.25])
    e = timestep_embedding(t, T)
    assert e.shape == (4, T)
    np.testing.assert_allclose(e.double().numpy(), _hand_embedding(t.numpy(), T), atol=1e-6)
    # order is [sin, cos]: first frequency is exp(0) = 1 -> sin(t) then cos(t) at index half
    assert torch.allclose(e[:, 0], torch.sin(t)) and torch.allclose(e[:, T // 2], torch.cos(t))
    assert timestep_embedding(0.5, T).shape == (1, T)
    assert torch.equal(timestep_embedding(torch.tensor(0.5), T), e[2:3])
    with pytest.raises(ValueError, match="1000"):
        timestep_embedding(torch.tensor([500.0]), T)
    with pytest.raises(ValueError, match="1-d"):
        timestep_embedding(torch.zeros(2, 2), T)


def test_forward_follows_formulas_by_hand():
    m = _random()
    B, S = 3, 5
    x = torch.randn(B, S, D, dtype=torch.float64)
    t = np.array([1.0, 0.5, 0.25])
    sd = {k: v.double().numpy() for k, v in m.state_dict().items()}
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    e = _hand_embedding(t, T)
    hid = silu(e @ sd["time_mlp.0.weight"].T + sd["time_mlp.0.bias"])
    hid = silu(hid @ sd["time_mlp.2.weight"].T + sd["time_mlp.2.bias"])
    mod = hid @ sd["mod_linear.weight"].T + sd["mod_linear.bias"]
    scale, shift = mod[:, :D], mod[:, D:]  # scale first
    x_mod = x.numpy() * (1 + scale[:, None, :]) + shift[:, None, :]
    h = x_mod @ sd["encoder.weight"].T + sd["encoder.bias"]
    z = np.maximum(h, 0)
    y = z @ sd["decoder.weight"].T + sd["decoder.bias"]

    m64 = m.double()
    tt = torch.tensor(t)
    sc, sh = m64.modulation(tt)
    assert sc.shape == sh.shape == (B, D)
    np.testing.assert_allclose(sc.detach().numpy(), scale, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m64.film(x, tt).detach().numpy(), x_mod, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m64.preactivations(x, tt).detach().numpy(), h, rtol=1e-5, atol=1e-6)
    y_hat, z_t = m64(x, tt)
    assert z_t.shape == (B, S, D * EF) and (z_t > 0).any() and (z_t == 0).any()
    np.testing.assert_allclose(z_t.detach().numpy(), z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y_hat.detach().numpy(), y, rtol=1e-5, atol=1e-6)
    assert torch.equal(m64.encode(x, tt), z_t) and torch.equal(m64.decode(z_t), y_hat)


def test_film_batched_t_equals_per_item_scalar_t_and_validates():
    m = _random()
    x = torch.randn(2, 7, D)
    t = torch.tensor([0.9, 0.3])
    out = m.film(x, t)
    for b in range(2):
        assert torch.allclose(out[b], m.film(x[b], float(t[b])), atol=1e-6)
    assert not torch.allclose(out[0], out[1] - x[1] + x[0], atol=1e-3)  # per-item t matters
    assert m.film(torch.randn(D), 0.5).shape == (D,)  # scalar t broadcasts over everything
    with pytest.raises(ValueError, match="leading dim 2"):
        m.film(torch.randn(3, 7, D), t)
    with pytest.raises(ValueError, match=f"d_model={D}"):
        m.film(torch.randn(2, 7, D + 1), t)


# ---------------------------------------------------------------- init recipe
def test_init_recipe():
    m = _random().init_recipe_(torch.Generator().manual_seed(1))
    W = m.decoder.weight
    torch.testing.assert_close(W.norm(dim=0), torch.ones(D * EF))
    assert torch.equal(m.encoder.weight, W.T) and m.encoder.weight.data_ptr() != W.data_ptr()
    assert not m.decoder.bias.any() and not m.encoder.bias.any()
    assert not m.mod_linear.weight.any() and not m.mod_linear.bias.any()
    x = torch.randn(2, 3, D)
    assert torch.equal(m.film(x, torch.tensor([0.2, 1.0])), x)  # FiLM identity
    again = _random(seed=5).init_recipe_(torch.Generator().manual_seed(1))
    other = _random(seed=5).init_recipe_(torch.Generator().manual_seed(2))
    assert transcoder_checksum(again) == transcoder_checksum(m) != transcoder_checksum(other)


def test_normalize_decoder():
    m = _random()
    assert not torch.allclose(m.decoder.weight.norm(dim=0), torch.ones(D * EF))
    direction = m.decoder.weight[:, 3] / m.decoder.weight[:, 3].norm()
    m.normalize_decoder_()
    torch.testing.assert_close(m.decoder.weight.norm(dim=0), torch.ones(D * EF))
    torch.testing.assert_close(m.decoder.weight[:, 3], direction)


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("cls,role,folder,stem", [
    (TemporalAwareTranscoder, "transcoder", "temporal-aware-transcoders", "transcoder"),
    (TemporalAwareSAE, "sae", "temporal-aware-saes", "sae"),
])
def test_save_load_round_trip(tmp_path, cls, role, folder, stem):
    mods = {"img_6": _random(cls, 1), "txt_6": _random(cls, 2), "img_12": _random(cls, 3)}
    sums = save_transcoders(mods, tmp_path, metadata={"note": "unit"})
    assert set(sums) == set(mods)
    for key, s in sums.items():
        stream, layer = parse_key(key)
        assert file_sha256(tmp_path / folder / f"{stem}_{stream}_{layer}.pt") == s
    manifest = json.loads((tmp_path / folder / "manifest.json").read_text())
    assert (manifest["d_model"], manifest["expansion_factor"], manifest["time_embed_dim"]) == (D, EF, T)
    assert manifest["role"] == role and manifest["metadata"] == {"note": "unit"}
    assert manifest["files"][f"{stem}_img_6.pt"] == sums["img_6"]
    assert not [p for p in os.listdir(tmp_path / folder) if p.endswith(".tmp")]

    loaded = load_transcoders(str(tmp_path), role=role, **SMALL)
    assert list(loaded) == ["img_6", "img_12", "txt_6"]
    x, t = torch.randn(2, 4, D), torch.tensor([1.0, 0.25])
    for key, m in loaded.items():
        assert type(m) is cls and not m.training and m.encoder.weight.dtype == torch.float32
        assert transcoder_checksum(m) == transcoder_checksum(mods[key])
        for a, b in zip(m(x, t), mods[key](x, t)):
            assert torch.equal(a, b)
    only = load_transcoders(tmp_path, layers=6, streams="txt", role=role, dtype=torch.float64, **SMALL)
    assert list(only) == ["txt_6"] and only["txt_6"].decoder.weight.dtype == torch.float64


def test_checksum_tracks_weights():
    a, b = _random(seed=0), _random(seed=0)
    assert transcoder_checksum(a) == transcoder_checksum(b)
    with torch.no_grad():
        b.decoder.bias[0] += 1e-3
    assert transcoder_checksum(a) != transcoder_checksum(b)


def test_wrong_shape_missing_and_unexpected_keys(tmp_path):
    m = TemporalAwareTranscoder(**SMALL)
    sd = m.state_dict()
    sd["encoder.weight"] = torch.zeros(D * EF, D + 1)
    sd.pop("decoder.bias")
    sd["extra.thing"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as ei:
        check_state_dict(sd, m, "some_file.pt")
    msg = str(ei.value)
    assert "some_file.pt" in msg and "encoder.weight" in msg
    assert f"expected shape [{D * EF}, {D}]" in msg and f"found [{D * EF}, {D + 1}]" in msg
    assert "decoder.bias" in msg and "missing" in msg
    assert "extra.thing" in msg and "unexpected" in msg
    check_state_dict(m.state_dict(), m, "ok.pt")  # matching dict passes

    folder = tmp_path / "temporal-aware-transcoders"
    folder.mkdir()
    torch.save(sd, folder / "transcoder_img_3.pt")
    with pytest.raises(CheckpointError, match="transcoder_img_3.pt"):
        load_transcoders(tmp_path, layers=[3], streams=["img"], **SMALL)


def test_unknown_stream_and_missing_layer(tmp_path):
    save_transcoders({"img_0": _random(), "img_5": _random(), "txt_1": _random()}, tmp_path)
    with pytest.raises(ValueError, match=r"'img', 'txt'"):
        load_transcoders(tmp_path, streams=["vid"], **SMALL)
    with pytest.raises(FileNotFoundError, match=r"layer 7.*available img layers: \[0, 5\]"):
        load_transcoders(tmp_path, layers=[0, 7], streams=["img"], **SMALL)
    with pytest.raises(FileNotFoundError, match=r"temporal-aware-saes"):
        load_transcoders(tmp_path, role="sae", **SMALL)
    assert STREAMS == ("img", "txt")


def test_parse_key():
    assert parse_key("img_6") == ("img", 6) and parse_key("txt_18") == ("txt", 18)
    for bad in ("vid_6", "img6", "img_x", "img_6_1"):
        with pytest.raises(ValueError, match="stream"):
            parse_key(bad)


def test_hub_download_path(tmp_path, monkeypatch):
    save_transcoders({"img_6": _random(seed=7), "img_12": _random(seed=8)}, tmp_path)
    calls = []

    def fake_download(repo_id, filename, revision=None, **kw):
        calls.append((repo_id, filename, revision))
        path = tmp_path / filename
        if not path.exists():
            raise ckpt_mod.EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    def fake_list(repo_id, revision=None, **kw):
        calls.append((repo_id, "LIST", revision))
        return [f"temporal-aware-transcoders/{n}" for n in os.listdir(tmp_path / "temporal-aware-transcoders")]

    monkeypatch.setattr(ckpt_mod.huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(ckpt_mod.huggingface_hub, "list_repo_files", fake_list)
    repo = "someone/not-a-local-dir"
    out = load_transcoders(repo, layers=[6], streams=["img"], revision="abc123", **SMALL)
    assert calls == [(repo, "temporal-aware-transcoders/transcoder_img_6.pt", "abc123")]
    assert transcoder_checksum(out["img_6"]) == transcoder_checksum(_random(seed=7))

    calls.clear()
    out = load_transcoders(repo, streams=["img"], revision="r2", **SMALL)  # layers=None -> list
    assert list(out) == ["img_6", "img_12"] and calls[0] == (repo, "LIST", "r2")
    with pytest.raises(FileNotFoundError, match=r"available img layers: \[6, 12\]"):
        load_transcoders(repo, layers=[9], streams=["img"], **SMALL)
