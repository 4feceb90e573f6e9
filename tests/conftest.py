"""Shared fixtures: a small real atlas ingested once per test session (tiny pipeline)."""

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent.parent / "data" / "prompts"


@pytest.fixture(scope="session")
def small_atlas(tmp_path_factory) -> Path:
    """12 T2I-CompBench colour prompts through the tiny pipeline, random-init transcoders."""
    from atlas.ingest.config import RunConfig
    from atlas.ingest.runner import run_ingest

    out = tmp_path_factory.mktemp("small") / "atlas"
    run_ingest(RunConfig(prompts=str(DATA / "t2i-compbench" / "color_val.txt"), out=str(out), limit=12,
                         batch_size=6, top_k=5, model="tiny"), progress=False)
    return out
