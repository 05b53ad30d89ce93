"""Safe file IO: every file the package writes is written atomically (a temporary name in the same directory, then
``os.replace``), and every failure to write or read one is a one-line :class:`~influencelab.errors.FileFaultError`
naming the file, the cause and the fix: a full disk (which file system, how much was needed and how much is free),
a file size limit, permissions, a read-only file system, a file where a directory belongs; a truncated, corrupt or
other-version file (:class:`~influencelab.errors.CorruptFileError`, with what regenerates it).

A partial write is never read as valid: the final name appears only once the whole file is on disk, and a
safetensors file is checked against its own header (its length) before it is read. The temporary file of a write
killed midway (SIGKILL, a node lost) names its writer and is removed by the next write of that file, or by
:func:`remove_stale_temps` (the cache sweeps itself once per process), once that writer is gone.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import CorruptFileError, FileFaultError

#: written into every safetensors file's metadata; a file with another value is from an incompatible version
FORMAT_KEY, FORMAT_VERSION = "influencelab_format", "1"
#: the SHA-256 of a safetensors file's tensors (:func:`tensors_digest`), in its metadata: a flipped bit is found
DIGEST_KEY = "influencelab_sha256"
#: the most bytes a safetensors header may have (the library's own limit)
MAX_HEADER = 100_000_000


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # (unreachable)


def _existing_dir(path: Path) -> Path:
    p = path if path.is_dir() else path.parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(_existing_dir(path)).free
    except OSError:
        return None


def _blocking_file(path: Path) -> Path | None:
    """The first ancestor of ``path`` that exists and is not a directory (a file where a directory belongs)."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def describe_write_error(e: OSError, path: Path, needed: int | None = None, where: str | None = None) -> str:
    """One line for a failed write of ``path``: the cause and the fix. ``where``: the setting that moves such files
    elsewhere (``paths.cache``, ``hydra.run.dir``)."""
    move = f", or set {where} to a directory on another disk" if where else ""
    code = e.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(path)
        amount = f"{human_bytes(needed)} needed" if needed is not None else "more space needed"
        if free is not None:
            amount += f", {human_bytes(free)} free"
        what = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
        return (f"cannot write {path}: {what} ({amount} on the file system of {_existing_dir(path)}): free space "
                f"there{move}, then rerun (finished work is kept)")
    if code == errno.EFBIG:
        size = f" ({human_bytes(needed)})" if needed is not None else ""
        return (f"cannot write {path}: the file{size} exceeds the file size limit (ulimit -f) or the file system's "
                f"maximum: raise the limit{move}")
    if code in (errno.EACCES, errno.EPERM):
        return (f"cannot write {path}: permission denied: make {_existing_dir(path)} writable "
                f"(chmod u+w or chown){move}")
    if code == errno.EROFS:
        return f"cannot write {path}: the file system of {_existing_dir(path)} is read-only: remount it read-write{move}"
    if code in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        block = _blocking_file(path)
        if block is not None:
            return (f"cannot write {path}: {block} is a file where a directory is expected: move or remove it"
                    f"{move}")
        if path.is_dir():
            return f"cannot write {path}: a directory of that name exists: move or remove it{move}"
    reason = e.strerror or str(e)
    return f"cannot write {path}: {reason} (errno {code}){move}"


def describe_read_error(e: OSError, path: Path, regenerate: str | None = None) -> str:
    fix = f"; regenerate it: {regenerate}" if regenerate else ""
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"cannot read {path}: permission denied: make it readable (chmod u+r or chown){fix}"
    if e.errno in (errno.ENOTDIR, errno.EISDIR):
        return f"cannot read {path}: not a regular file (a directory where a file is expected, or the reverse){fix}"
    return f"cannot read {path}: {e.strerror or e} (errno {e.errno}){fix}"


@contextmanager
def writing(path: str | Path, needed: int | None = None, where: str | None = None) -> Iterator[None]:
    """Turn an ``OSError`` raised while writing ``path`` into a one-line :class:`FileFaultError`."""
    try:
        yield
    except FileFaultError:
        raise
    except OSError as e:
        raise FileFaultError(describe_write_error(e, Path(path), needed, where)) from e


def _mkdir(path: Path, where: str | None) -> None:
    with writing(path, where=where):
        path.parent.mkdir(parents=True, exist_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes, where: str | None = None) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory, ``fsync`` and ``os.replace``: a reader sees
    the old file or the whole new one, never part of it. A failure removes the temp file and is a one-line
    :class:`FileFaultError` (e.g. a full disk: which file system, how much was needed)."""
    atomic_write(path, lambda f: f.write(data), len(data), where)


def atomic_write(path: str | Path, write: Callable[[Any], Any], needed: int | None = None,
                 where: str | None = None) -> None:
    """:func:`atomic_write_bytes` with the content written by ``write(file)`` (streamed: never all in memory)."""
    path = Path(path)
    _mkdir(path, where)
    with writing(path, needed, where):
        # the temp name carries its writer (host and pid): one left by a killed writer is found and removed
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_owner()}.", suffix=TEMP_SUFFIX)
        try:
            try:  # mkstemp's 0600 would hide a shared cache from the other users
                os.fchmod(fd, 0o666 & ~_umask())
            except OSError:  # (a file system without modes)
                pass
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    remove_stale_temps(path.parent, path.name)  # an earlier write of this file killed midway (SIGKILL, power)


#: every temporary file of :func:`atomic_write_bytes` ends so; its name is ``.<file>.<host>-<pid>.<random>.tmp``
TEMP_SUFFIX = ".tmp"
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<host>\w+)-(?P<pid>\d+)\.\w+" + re.escape(TEMP_SUFFIX) + "$")
#: a temporary file this old is removed whoever wrote it (another host's, or one of an older naming)
STALE_TEMP_S = 24 * 3600.0
_UMASK: list[int] = []


def _host() -> str:
    return re.sub(r"\W", "_", socket.gethostname()) or "host"


def _owner() -> str:
    return f"{_host()}-{os.getpid()}"


def _umask() -> int:
    if not _UMASK:
        _UMASK.append(os.umask(0o022))
        os.umask(_UMASK[0])
    return _UMASK[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's live process
        return True
    return True


def stale_temp(path: Path, now: float | None = None) -> bool:
    """Whether ``path`` is a temporary file of :func:`atomic_write_bytes` whose writer is gone: a process of this
    host that no longer runs (killed mid-write), or any writer's after :data:`STALE_TEMP_S`. A live writer's (this
    host, its pid running) is never stale before that age."""
    name = path.name
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return False
    m = _TEMP.match(name)
    if m and m["host"] == _host() and not _alive(int(m["pid"])):
        return True
    try:
        return (now or time.time()) - path.stat().st_mtime > STALE_TEMP_S
    except OSError:
        return False


def remove_stale_temps(directory: str | Path, name: str | None = None, recursive: bool = False) -> list[Path]:
    """Remove the temporary files that killed writes left in ``directory`` (of the file ``name`` only, or of
    any; ``recursive``: in its subdirectories too) and return them. Best effort: a file that cannot be removed
    (read-only, gone already) is left to the next call."""
    directory = Path(directory)
    pattern = f".{glob.escape(name)}.*{TEMP_SUFFIX}" if name else f".*{TEMP_SUFFIX}"
    removed = []
    try:
        found = list(directory.rglob(pattern) if recursive else directory.glob(pattern))
    except OSError:
        return removed
    now = time.time()
    for p in found:
        if stale_temp(p, now):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def atomic_write_text(path: str | Path, text: str, where: str | None = None) -> None:
    atomic_write_bytes(path, text.encode(), where)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and raw bytes (names sorted)."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def tensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors serialisation of ``tensors`` (on the CPU, contiguous), stamped with :data:`FORMAT_KEY` and
    the tensors' digest (:data:`DIGEST_KEY`, verified by :func:`read_tensors`)."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {**(metadata or {}), FORMAT_KEY: FORMAT_VERSION, DIGEST_KEY: tensors_digest(tensors)}
    return save(tensors, metadata=meta)


#: torch dtypes in safetensors' header names
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def _tensor_view(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, without a copy when it is contiguous."""
    t = t.detach().cpu().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                 where: str | None = None) -> str:
    """Atomically write a safetensors file (stamped as :func:`tensors_bytes` stamps it); returns its SHA-256.
    Streamed tensor by tensor: unlike the library's ``save`` (the whole file as one ``bytes``), it holds no copy
    of the tensors (a fit's final float64 covariances of ResNet-50 took 2.15 GB more that way). Other dtypes than
    :data:`_ST_DTYPES` go through :func:`tensors_bytes`."""
    import hashlib

    if any(t.dtype not in _ST_DTYPES for t in tensors.values()):
        data = tensors_bytes(tensors, metadata)
        atomic_write_bytes(path, data, where)
        return hashlib.sha256(data).hexdigest()
    meta = {**(metadata or {}), FORMAT_KEY: FORMAT_VERSION, DIGEST_KEY: tensors_digest(tensors)}
    header: dict[str, Any] = {"__metadata__": meta}
    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))  # (as the library orders: alignment)
    offset = 0
    for k in names:
        t = tensors[k]
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # (padded to 8 bytes, as the library pads it)
    prefix = struct.pack("<Q", len(head)) + head
    h = hashlib.sha256(prefix)

    def write(f: Any) -> None:
        f.write(prefix)
        for k in names:
            view = _tensor_view(tensors[k])
            h.update(view)
            f.write(view)

    atomic_write(path, write, len(prefix) + offset, where)
    return h.hexdigest()


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file of this package's format (truncated, not safetensors,
    another version), or ``None`` when its header is consistent with its size. Reads only the header."""
    size = path.stat().st_size
    if size < 8:
        return f"truncated ({size} bytes, not even a header)"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER:
            return "corrupt (not a safetensors file: impossible header length)"
        if 8 + n > size:
            return f"truncated ({size:,} bytes of at least {8 + n:,})"
        raw = f.read(n)
    try:
        header = json.loads(raw)
        assert isinstance(header, dict)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
        return "corrupt (its header is not valid safetensors JSON)"
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return f"truncated ({size:,} of {expected:,} bytes)"
    if size > expected:
        return f"corrupt ({size - expected:,} bytes more than its header describes)"
    version = (header.get("__metadata__") or {}).get(FORMAT_KEY)
    if version is not None and version != FORMAT_VERSION:
        return f"written by another version of influencelab (format {version}; this one reads {FORMAT_VERSION})"
    return None


def read_tensors(path: str | Path, regenerate: str | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file, verified first (:func:`safetensors_problem`). Failure is a
    one-line :class:`CorruptFileError` (or :class:`FileFaultError` when it cannot be read at all) naming the file,
    the cause and ``regenerate`` (the command that writes it again)."""
    from safetensors import safe_open

    path = Path(path)
    fix = f"; regenerate it: {regenerate}" if regenerate else "; delete it and rerun what wrote it"
    try:
        problem = safetensors_problem(path)
        if problem is None:
            with safe_open(str(path), "pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta.pop(FORMAT_KEY, None)
            expected = meta.pop(DIGEST_KEY, None)
            if expected is None or tensors_digest(tensors) == expected:
                return tensors, meta
            problem = "corrupt (its tensors do not match the checksum written with them)"
    except FileNotFoundError:
        raise
    except OSError as e:
        raise FileFaultError(describe_read_error(e, path, regenerate)) from e
    except Exception as e:  # noqa: BLE001 (safetensors' own errors: a corrupt body)
        problem = f"corrupt ({(str(e).splitlines() or [type(e).__name__])[0]})"
    raise CorruptFileError(f"{path} is {problem}{fix}")


def read_json(path: str | Path, regenerate: str | None = None) -> Any:
    """A JSON file's content; unreadable or invalid JSON is a one-line error naming the file and ``regenerate``."""
    path = Path(path)
    fix = f"; regenerate it: {regenerate}" if regenerate else "; delete it and rerun what wrote it"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise FileFaultError(describe_read_error(e, path, regenerate)) from e
    except UnicodeDecodeError:
        raise CorruptFileError(f"{path} is corrupt (not text){fix}") from None
    try:
        return json.loads(text)
    except ValueError as e:
        ended = e.pos >= len(text.rstrip()) - 1 or e.msg.startswith("Unterminated")  # type: ignore[attr-defined]
        cause = f"{'truncated' if text.strip() and ended else 'corrupt'} (invalid JSON: {e})"
        err = CorruptFileError(f"{path} is {cause}{fix}")
        err.cause = cause  # type: ignore[attr-defined]
        raise err from None


def rerun_command(run_dir: str | Path, stages: str | None = None) -> str:
    """The command that rewrites a run directory's outputs: its overrides (``.hydra/overrides.yaml``) with
    ``hydra.run.dir`` set to it (and ``stages`` when given)."""
    import yaml

    run_dir = Path(run_dir)
    overrides: list[str] = []
    try:
        overrides = [str(o) for o in yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []]
    except (OSError, yaml.YAMLError):
        pass
    if stages is not None:
        overrides = [o for o in overrides if not o.lstrip("+").startswith("stages=")] + [f"stages={stages}"]
    overrides = [o for o in overrides if not o.startswith("hydra.run.dir=")]
    return " ".join(["influencelab", *(f"'{o}'" if any(c in o for c in " [],") else o for o in overrides),
                     f"hydra.run.dir={run_dir}"])


def read_csv(path: str | Path, regenerate: str | None = None, **kwargs: Any) -> Any:
    """``pandas.read_csv`` of a file the project wrote (a report CSV); unreadable, empty or malformed is a one-line
    error naming the file and ``regenerate`` (the command that rewrites it)."""
    import pandas as pd

    path = Path(path)
    fix = f"; regenerate it: {regenerate}" if regenerate else "; delete it and rerun what wrote it"
    try:
        return pd.read_csv(path, **kwargs)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise FileFaultError(describe_read_error(e, path, regenerate)) from e
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        cause = "empty" if isinstance(e, pd.errors.EmptyDataError) else f"corrupt ({str(e).splitlines()[0]})"
        raise CorruptFileError(f"{path} is {cause}{fix}") from None


def write_csv(frame: Any, path: str | Path, where: str | None = None) -> None:
    """A DataFrame as CSV, written whole or not at all (:func:`atomic_write_text`)."""
    atomic_write_text(path, frame.to_csv(index=False), where=where)
