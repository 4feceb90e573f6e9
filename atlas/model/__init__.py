"""Model stage: load a FluxPipeline (hub id, local folder or built-in), and read its MLPs.

- `load_pipeline`, `recommended_settings`, `describe_pipeline` (atlas.model.loading)
- `build_tiny_pipeline`, `TINY_RECOMMENDED` (atlas.model.tiny): an offline tiny FLUX pipeline
- `MLPCapture`, `MLPRecord`, `StepRecord`, `validate_layers_streams` (atlas.model.capture)
"""

from atlas.model.capture import STREAMS, MLPCapture, MLPRecord, StepRecord, stream_modules, validate_layers_streams
from atlas.model.loading import (
    BUILTIN_MODELS,
    DEFAULT_MODEL_ID,
    FLUX_SCHNELL_RECOMMENDED,
    ModelLoadError,
    describe_pipeline,
    load_pipeline,
    recommended_settings,
)
from atlas.model.tiny import TINY_RECOMMENDED, build_tiny_pipeline, build_tiny_tokenizer

__all__ = [
    "BUILTIN_MODELS", "DEFAULT_MODEL_ID", "FLUX_SCHNELL_RECOMMENDED", "TINY_RECOMMENDED", "STREAMS",
    "ModelLoadError", "MLPCapture", "MLPRecord", "StepRecord",
    "build_tiny_pipeline", "build_tiny_tokenizer", "describe_pipeline", "load_pipeline",
    "recommended_settings", "stream_modules", "validate_layers_streams",
]
