"""A real `atlas ingest` subprocess killed with SIGKILL mid-batch: only whole batches are visible,
and the rerun completes the atlas with exactly the rows of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from atlas.ingest.config import RunConfig
from atlas.ingest.runner import run_ingest
from atlas.store.catalog import connect

DATA = Path(__file__).resolve().parent.parent / "data" / "prompts" / "t2i-compbench" / "color_val.txt"
N, BATCH = 24, 3
ORDER = "prompt_id, layer, stream, step, position, feature"


def _ingest_cmd(prompts, out):
    return [sys.executable, "-m", "atlas.cli", "ingest", "--prompts", str(prompts), "--out", str(out), "--model", "tiny",
            "--limit", str(N), "--batch-size", str(BATCH), "--no-progress"]


def _kill_mid_batch(prompts, out) -> None:
    """Start ingest, SIGKILL it as soon as the second batch has begun writing (its first image)."""
    proc = subprocess.Popen(_ingest_cmd(prompts, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if len(list((out / "images").glob("*/*.png"))) > BATCH:
                break
            if proc.poll() is not None:
                pytest.fail(f"ingest ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.002)
        else:
            pytest.fail("ingest did not reach its second batch in 120 s")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()


def test_sigkill_mid_batch_then_resume(tmp_path):
    out = tmp_path / "killed"
    _kill_mid_batch(DATA, out)

    with connect(out, read_only=True) as con:
        (committed,), = con.execute("SELECT count(*) FROM batches").fetchall()
        prompts = {p for (p,) in con.execute("SELECT prompt_id FROM prompts").fetchall()}
        with_rows = {p for (p,) in con.execute("SELECT DISTINCT prompt_id FROM activations").fetchall()}
        batch_of_rows = {b for (b,) in con.execute("SELECT DISTINCT batch_id FROM activations").fetchall()}
        (status,), = con.execute("SELECT status FROM runs").fetchall()
    assert committed < N // BATCH, "the run was not interrupted"
    assert status == "running"
    assert len(prompts) == committed * BATCH  # whole batches only
    assert with_rows == prompts  # every visible activation belongs to a committed generation, and back
    assert batch_of_rows == set(range(committed))
    for f in (out / "facts").rglob("*.parquet"):  # every file under a visible name is a complete file
        pq.read_metadata(f)

    result = run_ingest(RunConfig(prompts=str(DATA), out=str(out), limit=N, batch_size=BATCH, model="tiny"), progress=False)
    assert result.resumed and result.generations_new == N - committed * BATCH
    assert not list(out.rglob("*.tmp"))

    clean = tmp_path / "clean"
    run_ingest(RunConfig(prompts=str(DATA), out=str(clean), limit=N, batch_size=BATCH, model="tiny"), progress=False)
    with connect(out, read_only=True) as a, connect(clean, read_only=True) as b:
        got = a.sql(f"SELECT {ORDER}, value FROM activations ORDER BY {ORDER}").fetchall()
        want = b.sql(f"SELECT {ORDER}, value FROM activations ORDER BY {ORDER}").fetchall()
        assert got == want
        (n, distinct), = a.execute(f"SELECT count(*), count(DISTINCT ({ORDER})) FROM activations").fetchall()
        assert n == distinct
        top_a = a.sql("SELECT * EXCLUDE (run_id) FROM top_examples ORDER BY ALL").fetchall()
        top_b = b.sql("SELECT * EXCLUDE (run_id) FROM top_examples ORDER BY ALL").fetchall()
        assert top_a == top_b
        assert a.execute("SELECT status, n_prompts FROM runs").fetchall() == [("complete", N)]
