"""Incremental, atomic writing of the report's files, with a manifest.

The report folder holds a manifest (``.atlas-report.json``) naming every file the renderer wrote
and a key for each: the sha256 of a page's content (prefixed by a digest of the page's input
rows where the renderer has one), or for derived files (copied / upscaled images) a key of their
inputs. On a rerun a page whose input digest is unchanged is not even rendered, a file is
rewritten only if its content changed (or the file is missing), files the renderer no longer
produces are removed, and files that are not in the manifest are never touched. The manifest also records a fingerprint of everything the report
depends on (atlas files, templates, renderer code, SQL, options): when it is unchanged the whole
render is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = ".atlas-report.json"
MANIFEST_VERSION = 1


class ReportDirError(RuntimeError):
    """The output folder cannot be used for a report (not empty and not a report)."""


@dataclass
class WriteStats:
    """What a render did to the files of the report folder."""

    written: list[str] = field(default_factory=list)
    unchanged: int = 0
    not_rendered: int = 0  # of the unchanged: pages skipped without rendering (same input rows)
    removed: list[str] = field(default_factory=list)

    @property
    def n_files(self) -> int:
        """Files the report consists of after this render."""
        return len(self.written) + self.unchanged


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class SiteWriter:
    """Writes files under ``out_dir`` only when their key changed; see the module docstring.

    Raises:
        ReportDirError: ``out_dir`` exists, is not empty and holds no report manifest.
    """

    def __init__(self, out_dir: str | Path):
        self.out = Path(out_dir)
        path = self.out / MANIFEST
        if self.out.exists() and not path.exists() and any(self.out.iterdir()):
            raise ReportDirError(f"{self.out} exists, is not empty and is not an atlas report; choose another --out")
        self.old: dict[str, str] = {}
        self.old_fingerprint: str | None = None
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data.get("version") == MANIFEST_VERSION:
                    self.old = dict(data.get("files", {}))
                    self.old_fingerprint = data.get("fingerprint")
            except (OSError, ValueError):
                pass  # unreadable manifest: everything is rewritten
        self.new: dict[str, str] = {}
        self.stats = WriteStats()
        if not path.exists():  # claim the folder first, so a render that fails half way can be rerun
            _write_atomic(path, json.dumps({"version": MANIFEST_VERSION, "fingerprint": None, "files": {}}).encode())

    def up_to_date(self, fingerprint: str) -> bool:
        """True if the last render had this input fingerprint and all its files still exist."""
        return (fingerprint == self.old_fingerprint and bool(self.old)
                and all((self.out / rel).is_file() for rel in self.old))

    def _keep_or_write(self, rel: str, key: str, produce: Callable[[], bytes]) -> None:
        if rel in self.new:
            raise ValueError(f"report file {rel} written twice")
        self.new[rel] = key
        if self.old.get(rel) == key and (self.out / rel).is_file():
            self.stats.unchanged += 1
            return
        _write_atomic(self.out / rel, produce())
        self.stats.written.append(rel)

    def unchanged_input(self, rel: str, input_key: str) -> bool:
        """True (and the file is kept) if the last render wrote ``rel`` from the same ``input_key``
        (see :meth:`write_text`), so the caller need not render it again."""
        old = self.old.get(rel)
        if old is not None and old.startswith(f"in:{input_key}/") and (self.out / rel).is_file():
            self.new[rel] = old
            self.stats.unchanged += 1
            self.stats.not_rendered += 1
            return True
        return False

    def write_text(self, rel: str, text: str, input_key: str | None = None) -> None:
        """Write a text file (UTF-8) unless its content is unchanged since the last render.

        ``input_key`` (a digest of what the page was rendered from) is recorded so the next render
        can skip rendering the page at all (:meth:`unchanged_input`).
        """
        data = text.encode("utf-8")
        sha = sha256_bytes(data)
        key = f"in:{input_key}/{sha}" if input_key is not None else sha
        if rel in self.new:
            raise ValueError(f"report file {rel} written twice")
        self.new[rel] = key
        if (self.old.get(rel) or "").rpartition("/")[2] == sha and (self.out / rel).is_file():
            self.stats.unchanged += 1
            return
        _write_atomic(self.out / rel, data)
        self.stats.written.append(rel)

    def write_derived(self, rel: str, key: str, produce: Callable[[], bytes]) -> None:
        """Write ``produce()`` to ``rel`` unless the last render wrote it with the same input ``key``."""
        self._keep_or_write(rel, "derived:" + key, produce)

    def finish(self, fingerprint: str) -> WriteStats:
        """Remove files of the last render that this one did not produce; write the manifest."""
        for rel in sorted(set(self.old) - set(self.new)):
            path = self.out / rel
            if path.is_file():
                path.unlink()
                self.stats.removed.append(rel)
                _prune_empty_dirs(path.parent, self.out)
        manifest = {"version": MANIFEST_VERSION, "fingerprint": fingerprint, "files": dict(sorted(self.new.items()))}
        _write_atomic(self.out / MANIFEST, json.dumps(manifest, indent=0).encode("utf-8"))
        return self.stats


def _prune_empty_dirs(folder: Path, root: Path) -> None:
    while folder != root and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def fingerprint(root: Path, paths_by_stat: Iterable[Path], paths_by_content: Iterable[Path], extra: object) -> str:
    """sha256 over the (path relative to ``root``, size, mtime) of ``paths_by_stat``, the names and
    bytes of ``paths_by_content`` and ``extra`` (JSON-serialisable options). Relative paths: a
    moved atlas (with its report) is still up to date."""
    h = hashlib.sha256()
    for p in sorted(paths_by_stat):
        try:
            st = p.stat()
        except OSError:
            continue
        h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for p in sorted(paths_by_content):
        h.update(p.name.encode() + b"\0")
        h.update(sha256_bytes(p.read_bytes()).encode())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()
