"""Load and save DifFRACT transcoder / SAE checkpoints in the published layout (facts sheet §1).

Layout (a hub model repo such as ``Artalmaz31/DifFRACT``, or a local folder)::

    temporal-aware-transcoders/transcoder_{stream}_{layer}.pt   # stream in {img, txt}
    temporal-aware-saes/sae_{stream}_{layer}.pt

Each file is a plain ``torch.save``d state_dict of a ``TemporalAwareTranscoder``.
Modules are keyed ``"{stream}_{layer}"`` (e.g. ``"img_6"``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

from .modules import TemporalAwareSAE, TemporalAwareTranscoder

__all__ = [
    "STREAMS", "LAYOUT", "CheckpointError", "check_state_dict", "load_transcoders",
    "save_transcoders", "file_sha256", "transcoder_checksum", "parse_key", "BUILTIN_TRANSCODERS",
    "resolve_transcoders",
]

STREAMS = ("img", "txt")
LAYOUT = {"transcoder": ("temporal-aware-transcoders", "transcoder"), "sae": ("temporal-aware-saes", "sae")}

#: Shipped transcoder folders (published layout) usable by name wherever a folder or hub repo is
#: accepted: "toy" holds the transcoders (every double-stream layer, both streams) and SAEs (two
#: layers) of the built-in toy model, trained by `make toy` (see data/toy/README.md).
BUILTIN_TRANSCODERS: dict[str, Path] = {"toy": Path(__file__).resolve().parents[2] / "data" / "toy"}


def resolve_transcoders(path_or_repo_id: str | os.PathLike) -> str:
    """A built-in name (a key of `BUILTIN_TRANSCODERS`) -> its folder; anything else unchanged
    (a local folder, or a hub repo id). Write "./toy" for a local folder called toy."""
    name = str(path_or_repo_id)
    return str(BUILTIN_TRANSCODERS[name]) if name in BUILTIN_TRANSCODERS else name
_CLASSES = {"transcoder": TemporalAwareTranscoder, "sae": TemporalAwareSAE}


class CheckpointError(ValueError):
    """A checkpoint file does not match the expected module (wrong/missing/unexpected keys)."""


def parse_key(key: str) -> tuple[str, int]:
    """Split a module key ``"{stream}_{layer}"`` into ``(stream, layer)``, e.g. "img_6" -> ("img", 6).

    Raises:
        ValueError: not of the form "<stream>_<int>" with stream in STREAMS ("img", "txt").
    """
    m = re.fullmatch(r"([a-z]+)_(\d+)", str(key))
    if m is None or m.group(1) not in STREAMS:
        raise ValueError(f"bad transcoder key {key!r}: expected '<stream>_<layer>' with stream in {STREAMS}, e.g. 'img_6'")
    return m.group(1), int(m.group(2))


def _check_role(role: str) -> tuple[str, str]:
    if role not in LAYOUT:
        raise ValueError(f"unknown role {role!r}; valid roles: {sorted(LAYOUT)}")
    return LAYOUT[role]


def check_state_dict(state_dict: dict, module: torch.nn.Module, file) -> None:
    """Check a loaded state_dict against ``module`` (may live on the meta device).

    Compares key sets and tensor shapes (dtypes are not checked; loading casts them).

    Raises:
        CheckpointError: naming ``file`` and listing every missing key, every unexpected key,
            and every key whose shape differs (with expected and found shapes).
    """
    expected = module.state_dict()
    problems = []
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing:
        problems.append(f"missing keys: {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    for k, ref in expected.items():
        if k in state_dict:
            got = state_dict[k]
            found = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            if found != tuple(ref.shape):
                problems.append(f"key {k!r}: expected shape {list(ref.shape)}, found {list(found) if isinstance(found, tuple) else found}")
    if problems:
        raise CheckpointError(f"checkpoint {file} does not match {type(module).__name__}"
                              f"({module.extra_repr()}):\n  " + "\n  ".join(problems))


def _layers_in(names, stem: str, stream: str) -> list[int]:
    pat = re.compile(rf"{re.escape(stem)}_{re.escape(stream)}_(\d+)\.pt")
    return sorted({int(m.group(1)) for n in names if (m := pat.fullmatch(os.path.basename(n)))})


def load_transcoders(path_or_repo_id, layers=None, streams=STREAMS, d_model: int = 3072,
                     expansion_factor: int = 16, time_embed_dim: int = 256, prefix: str | None = None,
                     device="cpu", dtype: torch.dtype = torch.float32, role: str = "transcoder",
                     revision: str | None = None) -> dict[str, TemporalAwareTranscoder]:
    """Load published transcoders (or SAEs with role="sae") into eval-mode modules.

    Reads ``{prefix}/{stem}_{stream}_{layer}.pt`` (prefix/stem from LAYOUT[role]) from a built-in
    folder (``BUILTIN_TRANSCODERS``, e.g. "toy"), from a local directory if ``path_or_repo_id`` is one, else from the hub via
    ``huggingface_hub.hf_hub_download(repo_id, filename=..., revision=revision)`` (honours
    HF_HUB_OFFLINE and the local cache). Each file is loaded with ``weights_only=True``,
    checked with ``check_state_dict`` and assigned into a module built on the meta device
    (no double allocation), then cast to ``dtype`` and moved to ``device``.
    Source: DifFRACT checkpoint layout (facts sheet §1).

    Args:
        layers: int or iterable of block indices; None = every layer found for each stream
            (local glob, or ``huggingface_hub.list_repo_files`` for the hub).
        streams: subset of STREAMS ("img" = ff, "txt" = ff_context); a single str is allowed.
        d_model, expansion_factor, time_embed_dim: expected architecture (full size 3072, 16, 256).

    Returns:
        {"{stream}_{layer}": module} in stream order, then ascending layer.

    Raises:
        ValueError: unknown stream (lists the valid ones) or unknown role.
        FileNotFoundError: a requested layer has no file (lists the available layers), or the
            local prefix folder does not exist.
        CheckpointError: a file's keys/shapes do not match the architecture.
    """
    folder, stem = _check_role(role)
    prefix = folder if prefix is None else prefix.strip("/")
    path_or_repo_id = resolve_transcoders(path_or_repo_id)
    streams = (streams,) if isinstance(streams, str) else tuple(streams)
    for s in streams:
        if s not in STREAMS:
            raise ValueError(f"unknown stream {s!r}; valid streams: {list(STREAMS)}")
    if layers is not None:
        layers = [int(layers)] if isinstance(layers, int) else sorted({int(layer) for layer in layers})

    local = os.path.isdir(path_or_repo_id)
    names_cache: list[str] = []

    def available_names() -> list[str]:
        if not names_cache:
            if local:
                names_cache.extend(str(p) for p in Path(path_or_repo_id, prefix).glob(f"{stem}_*.pt"))
            else:
                names_cache.extend(n for n in huggingface_hub.list_repo_files(path_or_repo_id, revision=revision)
                                   if n.startswith(prefix + "/"))
        return names_cache

    def not_found(stream: str, layer: int, where: str) -> FileNotFoundError:
        avail = _layers_in(available_names(), stem, stream)
        return FileNotFoundError(f"no {role} checkpoint for stream {stream!r} layer {layer} at {where}; "
                                 f"available {stream} layers: {avail}")

    if local and not Path(path_or_repo_id, prefix).is_dir():
        raise FileNotFoundError(f"{Path(path_or_repo_id, prefix)} is not a directory (expected the "
                                f"{role} layout '{prefix}/{stem}_<stream>_<layer>.pt')")
    out: dict[str, TemporalAwareTranscoder] = {}
    for stream in streams:
        wanted = layers if layers is not None else _layers_in(available_names(), stem, stream)
        for layer in wanted:
            filename = f"{prefix}/{stem}_{stream}_{layer}.pt"
            if local:
                path = os.path.join(path_or_repo_id, filename)
                if not os.path.isfile(path):
                    raise not_found(stream, layer, path)
            else:
                try:
                    path = huggingface_hub.hf_hub_download(path_or_repo_id, filename=filename, revision=revision)
                except EntryNotFoundError as err:
                    if isinstance(err, LocalEntryNotFoundError):
                        raise  # offline and not cached: not evidence that the layer is missing
                    raise not_found(stream, layer, f"{path_or_repo_id}/{filename}") from err
            out[f"{stream}_{layer}"] = _load_one(path, role, d_model, expansion_factor, time_embed_dim, device, dtype)
    return out


def _load_one(path, role, d_model, expansion_factor, time_embed_dim, device, dtype):
    with torch.device("meta"):
        module = _CLASSES[role](d_model, expansion_factor, time_embed_dim)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    check_state_dict(state_dict, module, path)
    module.load_state_dict(state_dict, strict=True, assign=True)
    del state_dict
    return module.to(device=device, dtype=dtype).eval()


def file_sha256(path, chunk_size: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks (constant memory).

    Raises:
        OSError: the file cannot be read.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def transcoder_checksum(module: torch.nn.Module) -> str:
    """Stable hex sha256 of a module's weights, independent of file format.

    Hashes, for every state-dict entry in sorted key order: the name, the shape, the dtype
    and the raw bytes (native byte order) of the contiguous CPU tensor. Identical weights ->
    identical id, so in-memory (e.g. randomly initialised) modules get a stable id too.

    Raises:
        ValueError: a tensor lives on the meta device (no data to hash).
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if t.device.type == "meta":
            raise ValueError(f"cannot checksum {name!r}: tensor is on the meta device")
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{list(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def _atomic_write(dest: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_transcoders(transcoders: dict[str, TemporalAwareTranscoder], out_dir, role: str | None = None,
                     metadata: dict | None = None) -> dict[str, str]:
    """Write modules to ``out_dir`` in the published layout, plus ``{prefix}/manifest.json``.

    Each file is ``torch.save`` of the state_dict (contiguous CPU clones), written to a temp
    name in the same folder and ``os.replace``d into place. The manifest records d_model,
    expansion_factor, time_embed_dim, role, per-file sha256 and ``metadata``; file entries
    of an existing compatible manifest are kept (so streams/layers can be saved in batches).
    Source: DifFRACT checkpoint layout (facts sheet §1).

    Args:
        transcoders: {"{stream}_{layer}": module}, all with the same architecture.
        role: "transcoder" or "sae"; default: the modules' (common) ``role``.
        metadata: JSON-serialisable extra fields (e.g. training config).

    Returns:
        {key: hex sha256 of the written file}.

    Raises:
        ValueError: empty dict, bad key, mixed roles or architectures, unknown role.
    """
    if not transcoders:
        raise ValueError("save_transcoders: nothing to save")
    for key in transcoders:
        parse_key(key)
    mods = list(transcoders.values())
    if role is None:
        roles = {m.role for m in mods}
        if len(roles) != 1:
            raise ValueError(f"modules have mixed roles {sorted(roles)}; pass role=")
        role = roles.pop()
    folder, stem = _check_role(role)
    archs = {(m.d_model, m.expansion_factor, m.time_embed_dim) for m in mods}
    if len(archs) != 1:
        raise ValueError(f"modules have different (d_model, expansion_factor, time_embed_dim): {sorted(archs)}")
    d_model, expansion_factor, time_embed_dim = archs.pop()
    sub = Path(out_dir, folder)
    sub.mkdir(parents=True, exist_ok=True)
    sums: dict[str, str] = {}
    files: dict[str, str] = {}
    for key, m in transcoders.items():
        stream, layer = parse_key(key)
        dest = sub / f"{stem}_{stream}_{layer}.pt"
        sd = {k: v.detach().contiguous().cpu().clone() for k, v in m.state_dict().items()}
        _atomic_write(dest, lambda f, sd=sd: torch.save(sd, f))
        sums[key] = files[dest.name] = file_sha256(dest)
    manifest = {"d_model": d_model, "expansion_factor": expansion_factor,
                "time_embed_dim": time_embed_dim, "role": role, "files": {}, "metadata": {}}
    mpath = sub / "manifest.json"
    if mpath.is_file():
        try:
            old = json.loads(mpath.read_text())
        except ValueError:
            old = {}
        if all(old.get(k) == manifest[k] for k in ("d_model", "expansion_factor", "time_embed_dim", "role")):
            manifest["files"].update(old.get("files", {}))
            manifest["metadata"].update(old.get("metadata", {}))
    manifest["files"].update(files)
    manifest["files"] = dict(sorted(manifest["files"].items()))
    manifest["metadata"].update(metadata or {})
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    _atomic_write(mpath, lambda f: f.write(text.encode()))
    return sums
