"""DifFRACT temporal-aware transcoders / SAEs and their checkpoints (facts sheet §1)."""

from .checkpoints import (
    BUILTIN_TRANSCODERS,
    LAYOUT,
    STREAMS,
    CheckpointError,
    check_state_dict,
    file_sha256,
    load_transcoders,
    parse_key,
    resolve_transcoders,
    save_transcoders,
    transcoder_checksum,
)
from .modules import TemporalAwareSAE, TemporalAwareTranscoder, timestep_embedding

__all__ = [
    "BUILTIN_TRANSCODERS",
    "LAYOUT",
    "STREAMS",
    "CheckpointError",
    "TemporalAwareSAE",
    "TemporalAwareTranscoder",
    "check_state_dict",
    "file_sha256",
    "load_transcoders",
    "parse_key",
    "resolve_transcoders",
    "save_transcoders",
    "timestep_embedding",
    "transcoder_checksum",
]
