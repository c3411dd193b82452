"""Safe outputs: msda replaces only what it wrote, and a result appears whole or not at all.

Every output is written under a temporary name beside its final path, then swapped in:

- a file by ``os.replace`` (atomic);
- a folder by an atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``), or where the file
  system lacks it, by renaming the old folder aside first; the old one is deleted last.

An output carries a marker naming its kind (``weights``, ``samples``, ...): a folder holds
``.msda-output``, a file has a hidden sidecar ``.<name>.msda-output``. An existing path is
replaced only when its marker names the same kind (or ``force``); an empty folder counts as
free. The working directory, its ancestors, the home directory and file-system roots are never
an output, nor is a path that is, or holds, one of the command's inputs.

Temporary names carry the host and process id (``.<name>.msda-tmp.<host>.<pid>.<token>``), so
that the next write to the same place removes what a killed process left, and puts an old
folder back when a kill fell between the two renames of the fallback.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import errno
import json
import os
import secrets
import shutil
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from msda.errors import MsdaError

MARKER = ".msda-output"
_TMP = "msda-tmp"
_OLD = "msda-old"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class OutputError(MsdaError):
    """An output path that would destroy what msda did not write, or that overlaps an input."""


# ----- markers --------------------------------------------------------------------------------
def _sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}{MARKER}")


def _inner_marker(path: Path) -> bool:
    """Folders hold their marker, except stores whose readers list every entry (Zarr)."""
    return path.is_dir() and not path.is_symlink() and path.suffix.lower() != ".zarr"


def _marker_file(path: Path) -> Path:
    return path / MARKER if _inner_marker(path) else _sidecar(path)


def output_kind(path: str | Path) -> str | None:
    """The kind recorded by msda for ``path`` (None: not an msda output, or no marker)."""
    path = Path(path)
    try:
        record = json.loads(_marker_file(path).read_text())
    except (OSError, ValueError):
        return None
    kind = record.get("kind") if isinstance(record, dict) else None
    return kind if isinstance(kind, str) else None


def _marker_text(kind: str) -> str:
    from msda import __version__

    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return json.dumps({"kind": kind, "msda": __version__, "written": now}) + "\n"


def _write_marker(target: Path, kind: str) -> None:
    tmp = target.with_name(f"{target.name}.{_TMP}.{_token()}")
    try:
        tmp.write_text(_marker_text(kind))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def mark_output(path: str | Path, kind: str) -> None:
    """Record ``path`` (an existing file or folder) as an msda output of ``kind``."""
    _write_marker(_marker_file(Path(path)), kind)


def file_fingerprint(path: str | Path, digest=None) -> str:
    """``sha256:<hex>`` of a file's bytes (or of a folder's files, by relative name, msda's
    markers and temporaries left out): an input's identity, wherever it lies."""
    import hashlib

    path = Path(path)
    digest = hashlib.sha256() if digest is None else digest
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = f.relative_to(path).as_posix()
            if any(part == MARKER or (part.startswith(".") and ".msda-" in part) for part in rel.split("/")):
                continue
            digest.update(rel.encode() + b"\0")
            file_fingerprint(f, digest)
    else:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return "sha256:" + digest.hexdigest()


# ----- checks ---------------------------------------------------------------------------------
def _resolved(path: str | Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path)))).resolve()


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output(path: str | Path, kind: str | None, inputs: Iterable[str | Path | None] = (),
                 force: bool = False) -> Path:
    """Refuse an output path that msda must not replace; returns the path.

    Always refused: the working directory or an ancestor of it, the home directory, a file
    system root, a path that is or holds an input. An existing path must be an msda output of
    ``kind`` (its marker), or an empty folder, unless ``force``. ``kind`` None is a part of an
    output being written inside an msda folder: files are replaced, folders need a marker.
    """
    path = Path(path)
    where = _resolved(path)
    cwd = Path.cwd().resolve()
    if _within(cwd, where):
        what = "the working directory" if where == cwd else "an ancestor of the working directory"
        raise OutputError(f"{path}: refusing to write an output over {what}; choose a new path")
    if where == Path.home().resolve() or where.parent == where:
        raise OutputError(f"{path}: refusing to write an output over the home directory or a root")
    for item in inputs:
        if item is None or str(item) in ("", "demo"):
            continue
        src = _resolved(item)
        if _within(src, where):
            relation = "is" if src == where else "holds"
            raise OutputError(f"{path}: the output {relation} the input {item}; choose another output path")
    here = Path(os.path.abspath(path))  # the path itself: a link is what would be replaced
    if not os.path.lexists(here) or force:
        return path
    is_dir = here.is_dir() and not here.is_symlink()
    if is_dir and not any(os.scandir(here)):
        return path
    found = output_kind(path)
    if kind is None:
        if not is_dir or found is not None:
            return path
        raise OutputError(f"{path}: exists and is not an msda output; refusing to replace it")
    if found == kind:
        return path
    if found is not None:
        raise OutputError(f"{path}: is an msda {found} output, not {kind}; choose another path or pass --force")
    what = "folder" if is_dir else "file"
    raise OutputError(
        f"{path}: an existing {what} that msda did not write (no {MARKER} marker); choose another path "
        "or pass --force to replace it"
    )


# ----- temporaries ----------------------------------------------------------------------------
def _token() -> str:
    return f"{socket.gethostname().replace('.', '_')}.{os.getpid()}.{secrets.token_hex(4)}"


def _dead(host: str, pid: str) -> bool:
    """True when ``host.pid`` names a process of this host that no longer runs."""
    if host != socket.gethostname().replace(".", "_") or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def recover(path: Path) -> None:
    """Tidy what killed msda processes left beside ``path``: put an old folder back when the
    new one never arrived, then delete their temporaries."""
    parent = path.parent
    prefix = f".{path.name}."
    try:
        names = [n for n in os.listdir(parent) if n.startswith(prefix)]
    except OSError:
        return
    for name in sorted(names):
        parts = name[len(prefix):].split(".")
        if len(parts) != 4 or parts[0] not in (_TMP, _OLD) or not _dead(parts[1], parts[2]):
            continue
        stale = parent / name
        if parts[0] == _OLD and not os.path.lexists(path):
            os.replace(stale, path)
        else:
            _remove(stale)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(tmp: Path, path: Path, token: str) -> None:
    """Put ``tmp`` at ``path``; the old content stays whole until the new one is in place."""
    if not os.path.lexists(path):
        os.replace(tmp, path)
        return
    old_is_dir = path.is_dir() and not path.is_symlink()
    if not old_is_dir and not tmp.is_dir():
        os.replace(tmp, path)
        return
    if old_is_dir and tmp.is_dir() and _exchange(tmp, path):
        _remove(tmp)  # now the old folder
        return
    old = path.with_name(f".{path.name}.{_OLD}.{token}")
    os.replace(path, old)
    os.replace(tmp, path)
    _remove(old)


def _restore(sidecar: Path, before: bytes | None) -> None:
    """Put a file's marker back as it was before a write that failed."""
    try:
        if before is None:
            if os.path.lexists(sidecar):
                sidecar.unlink()
        elif not os.path.lexists(sidecar) or sidecar.read_bytes() != before:
            sidecar.write_bytes(before)
    except OSError:
        pass


@contextmanager
def atomic_path(path: str | Path, kind: str | None = None, *, inputs: Iterable[str | Path | None] = (),
                force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; swap it in on success, with its marker.

    ``kind`` names the output (see :func:`check_output`); None writes a part of an msda
    output. On any exception the temporary is removed and ``path`` is untouched. OS errors
    (disk full, read-only folder) become one :class:`OutputError` naming ``path``.
    """
    path = Path(path)
    check_output(path, kind, inputs, force)
    parent = path.parent if str(path.parent) else Path(".")
    token = _token()
    tmp = parent / f".{path.name}.{_TMP}.{token}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        recover(path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write here ({exc.strerror or exc})") from None
    sidecar = _sidecar(path)
    sidecar_before = sidecar.read_bytes() if os.path.lexists(sidecar) else None
    try:
        yield tmp
        if not os.path.lexists(tmp):
            raise OutputError(f"{path}: nothing was written")
        inner = tmp.is_dir() and path.suffix.lower() != ".zarr"
        in_new_folder = f".{_TMP}." in parent.name  # a part of a folder being written: its marker covers it
        if kind is not None and (inner or not in_new_folder):
            _write_marker(tmp / MARKER if inner else sidecar, kind)
        _swap_in(tmp, path, token)
        if inner and kind is not None and os.path.lexists(sidecar):
            sidecar.unlink()  # the marker of a file this folder replaced
    except BaseException as exc:
        _remove(tmp)
        _restore(sidecar, sidecar_before)  # the old output keeps the marker it had
        if isinstance(exc, OSError):
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
        raise


def atomic_write_text(path: str | Path, text: str, kind: str | None = None, force: bool = False) -> None:
    with atomic_path(path, kind, force=force) as tmp:
        tmp.write_text(text)


@contextmanager
def output_folder(path: str | Path, kind: str, inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """A folder msda fills in place and resumes (an experiment's run directory): created with
    its marker, or reused when it is an msda ``kind`` output or empty."""
    path = Path(path)
    check_output(path, kind, inputs)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if output_kind(path) != kind:
            mark_output(path, kind)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write here ({exc.strerror or exc})") from None
    yield path
