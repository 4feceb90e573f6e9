"""Run configuration of `atlas ingest`: options, TOML files (ingest/*.toml) and the config hash."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path


#: The built-in offline pipeline used when no model is named (works with no hub access).
DEFAULT_OFFLINE_MODEL = "toy"

#: Transcoders used when a run names none: the toy model's shipped ones, and recipe-initialised,
#: density-calibrated random ones for the untrained `tiny` model (nothing trained exists for it).
#: Any other model must name its transcoders.
DEFAULT_TRANSCODERS = {"toy": "toy", "tiny": "random-init"}

#: Fields that do not change what a generation writes; excluded from the config hash so a rerun
#: with another --limit, batch size or device (or the same prompt file, by content, at another
#: path: ``prompts_sha256`` is hashed) resumes the same run.
_NOT_HASHED = {"prompts", "out", "limit", "batch_size", "device"}


def _streams() -> tuple[str, ...]:
    """The transcoder streams, imported on use so that reading configs (and the CLI) needs no torch."""
    from atlas.transcoders import STREAMS

    return STREAMS


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message says which field and why."""


@dataclass
class RunConfig:
    """Everything an ingest run needs. Unset (None) generation settings take the model's
    recommended values (:func:`atlas.model.recommended_settings`).

    Units: ``height``/``width`` in pixels; ``steps`` denoising steps; ``activation_threshold``
    in transcoder code units (z values at or below it are not stored).
    """

    prompts: str = ""
    out: str = ""
    model: str = DEFAULT_OFFLINE_MODEL
    revision: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    transcoders: str | None = None
    role: str = "transcoder"
    transcoder_prefix: str | None = None
    expansion_factor: int = 16
    time_embed_dim: int = 256
    random_init_seed: int = 0
    random_init_density: float = 0.01
    layers: list[int] | None = None
    streams: list[str] = field(default_factory=lambda: list(_streams()))
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    guidance_scale: float | None = None
    max_sequence_length: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    batch_size: int = 8
    top_k: int = 10
    activation_threshold: float = 0.0
    histogram_bins: int = 16
    limit: int | None = None
    prompts_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.transcoders is None:  # recorded resolved, so the runs table says what was used
            self.transcoders = DEFAULT_TRANSCODERS.get(self.model)

    def validate(self) -> None:
        """Raise ConfigError for values no run could use (checked before any work starts)."""
        if not self.transcoders:
            raise ConfigError(f"no transcoders given for model {self.model!r} (--transcoders FOLDER, hub repo id, "
                              f"a built-in name, or 'random-init'); models with default transcoders: "
                              f"{sorted(DEFAULT_TRANSCODERS)}")
        if not self.prompts:
            raise ConfigError("no prompt file given (--prompts FILE or `prompts = ...` in the run config)")
        if not self.out:
            raise ConfigError("no output atlas folder given (--out DIR or `out = ...` in the run config)")
        bad = [s for s in self.streams if s not in _streams()]
        if bad or not self.streams:
            raise ConfigError(f"unknown stream(s) {bad}; available streams: {list(_streams())}")
        if self.role not in ("transcoder", "sae"):
            raise ConfigError(f"role must be 'transcoder' or 'sae', not {self.role!r}")
        for name in ("batch_size", "top_k", "histogram_bins", "expansion_factor", "time_embed_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be at least 1, got {self.limit}")
        if not self.seeds:
            raise ConfigError("seeds must list at least one seed")
        if not 0.0 < self.random_init_density < 1.0:
            raise ConfigError(f"random_init_density must be in (0, 1), got {self.random_init_density}")
        if self.activation_threshold < 0:
            raise ConfigError(f"activation_threshold must be >= 0, got {self.activation_threshold}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """sha256 of the result-determining fields (all but prompts path, out, limit, batch size, device)."""
        payload = {k: v for k, v in self.to_dict().items() if k not in _NOT_HASHED}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def differences(self, other: RunConfig) -> dict[str, tuple]:
        """Hashed fields whose values differ: {field: (self's, other's)}."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if k not in _NOT_HASHED and a[k] != b[k]}


def load_run_config(path: str | Path) -> RunConfig:
    """Read a TOML run config (see ingest/*.toml). Relative ``prompts``/``out`` paths are kept
    as written (resolved against the working directory, like command-line paths).

    Raises:
        ConfigError: unreadable TOML, or keys that are not RunConfig fields (named).
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read run config {path}: {e}") from e
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    return RunConfig(**data)


def config_from_json(text: str) -> RunConfig:
    """Rebuild a RunConfig stored in the runs table."""
    return RunConfig(**json.loads(text))

