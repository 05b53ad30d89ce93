"""Content-addressed cache of expensive stages (trained models, curvature factors, scores).

An entry is ``<root>/<kind>/<key>.safetensors`` plus ``<key>.json`` (the config it was built from and the
SHA-256 of the tensor file). ``key`` hashes exactly the config the stage depends on. Both files are
written to a temporary name and renamed, tensors first, so a reader sees a complete entry or none; an
entry whose checksum or format does not verify is reported, deleted and rebuilt, never loaded. The temporary
files of writers killed midway are removed when a process first opens the cache (:func:`files.remove_stale_temps`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from . import files

log = logging.getLogger(__name__)

#: bump when a stage's output format or semantics change, to invalidate old entries
CACHE_VERSION = 1
#: cache roots already cleared of stale temp files by this process
_SWEPT: set[str] = set()


def config_hash(payload: Any) -> str:
    """Stable short hash of a JSON-able config (keys sorted)."""
    blob = json.dumps({"v": CACHE_VERSION, "cfg": payload}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def atomic_write_bytes(path: Path, data: bytes, where: str | None = None) -> None:
    """Write ``data`` to ``path`` atomically (:func:`influencelab.files.atomic_write_bytes`: a failure is one line)."""
    files.atomic_write_bytes(path, data, where)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                 where: str | None = None) -> str:
    """Atomically write a safetensors file; returns its SHA-256 (a failure is one line naming file, cause, fix;
    streamed tensor by tensor: :func:`influencelab.files.save_tensors`)."""
    return files.save_tensors(path, tensors, metadata, where)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Cache:
    """Stage outputs keyed by ``(kind, config)``; ``get`` verifies, ``put`` writes atomically."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        swept = str(self.root.absolute())
        if swept not in _SWEPT:  # once per process: the temp files of writers killed midway (a SIGKILLed job)
            _SWEPT.add(swept)
            gone = files.remove_stale_temps(self.root, recursive=True)
            if gone:
                log.info("removed %d temporary file(s) of interrupted cache writes under %s", len(gone), self.root)

    def key(self, payload: Any) -> str:
        return config_hash(payload)

    def paths(self, kind: str, key: str) -> tuple[Path, Path]:
        base = self.root / kind / key
        return base.with_suffix(".safetensors"), base.with_suffix(".json")

    def get(self, kind: str, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The entry's tensors and info, or ``None`` when absent or unusable: a truncated, corrupt, unreadable or
        other-version entry is reported in one warning, removed and recomputed by the caller, never loaded."""
        tpath, jpath = self.paths(kind, key)
        if not tpath.exists() and not jpath.exists():
            return None
        try:
            if not jpath.exists():
                raise ValueError("its .json record is missing (an interrupted write)")
            info = files.read_json(jpath)
            if not isinstance(info, dict) or "sha256" not in info:
                raise ValueError("its .json record is not an entry record")
            if int(info.get("version", CACHE_VERSION)) != CACHE_VERSION:
                raise ValueError(f"written by another version (cache format {info.get('version')}, "
                                 f"this one uses {CACHE_VERSION})")
            if not tpath.exists():
                raise ValueError(f"{tpath.name} is missing")
            if file_sha256(tpath) != info["sha256"]:
                raise ValueError(f"{tpath.name} does not match its checksum (truncated or altered)")
            tensors, _ = files.read_tensors(tpath)
        except Exception as e:  # any unreadable or inconsistent entry is rebuilt
            cause = str(e).splitlines()[0] if str(e) else type(e).__name__
            log.warning("cache entry %s is unusable (%s): removing it and recomputing", tpath.with_suffix(""), cause)
            for p in (tpath, jpath):
                try:
                    p.unlink(missing_ok=True)
                except OSError:  # (a read-only cache: the rewrite will say so in one line)
                    pass
            return None
        return tensors, info

    def put(self, kind: str, key: str, tensors: dict[str, torch.Tensor], config: Any,
            info: dict[str, Any] | None = None) -> Path:
        """Write an entry atomically (tensors, then the JSON that makes it valid). A failed write (full disk,
        permissions) is one line naming the file, the cause and the fix, and leaves no part of the entry."""
        tpath, jpath = self.paths(kind, key)
        digest = save_tensors(tpath, tensors, where="paths.cache")
        record = {"kind": kind, "key": key, "version": CACHE_VERSION, "sha256": digest, "config": config,
                  **(info or {})}
        try:
            atomic_write_bytes(jpath, json.dumps(record, indent=2, default=str).encode(), where="paths.cache")
        except BaseException:
            tpath.unlink(missing_ok=True)
            raise
        return tpath


class Snapshots:
    """Periodic snapshots of a long computation's running state (a solver's sums during ``fit``), so that a
    killed run resumes from its last snapshot instead of from scratch. Stored in the cache under
    ``snapshots/<key>-<phase>-<slot>`` (verified like any entry) and cleared once the final result is cached.

    Two slots are written alternately: a kill while one is being overwritten (tensors replaced, JSON not
    yet) leaves the other one valid, so a resume never falls back further than one snapshot."""

    SLOTS = ("a", "b")

    def __init__(self, cache: Cache, key: str, every_s: float = 30.0):
        self.cache, self.key, self.every_s = cache, key, float(every_s)
        self._last = time.monotonic()
        self._next: dict[str, int] = {}

    def load(self, phase: str) -> tuple[int, dict[str, torch.Tensor]] | None:
        """``(steps done, tensors)`` of the latest valid snapshot of ``phase``, or ``None``."""
        best: tuple[int, dict[str, torch.Tensor]] | None = None
        for i, slot in enumerate(self.SLOTS):
            hit = self.cache.get("snapshots", f"{self.key}-{phase}-{slot}")
            if hit is not None and (best is None or int(hit[1]["done"]) > best[0]):
                best = (int(hit[1]["done"]), hit[0])
                self._next[phase] = 1 - i  # overwrite the older slot next
        return best

    def save(self, phase: str, done: int, tensors: dict[str, torch.Tensor], final: bool = False) -> None:
        """Snapshot ``tensors`` after ``done`` steps, at most every ``every_s`` seconds (always when ``final``)."""
        if not final and time.monotonic() - self._last < self.every_s:
            return
        i = self._next.get(phase, 0)
        self.cache.put("snapshots", f"{self.key}-{phase}-{self.SLOTS[i]}", tensors, None, {"done": done})
        self._next[phase] = 1 - i
        self._last = time.monotonic()

    def clear(self) -> None:
        for path in (self.cache.root / "snapshots").glob(f"{self.key}-*"):
            path.unlink(missing_ok=True)
