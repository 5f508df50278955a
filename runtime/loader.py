"""Load rendered kernel source as a Python module, executing only text the planner rendered.

Triton's ``@jit`` reads a kernel's source through ``inspect`` (``linecache``) from the file of
its module, so a rendered module must live in a real file whose text is the source. ``load``:

1. names the file by the SHA-256 of the source: ``cache_dir()/<sha256>.py``;
2. reuses the file only if it is a regular file owned by this user, not writable by group or
   others, and its text equals the source; otherwise writes it again (a unique temporary
   name, mode 0o600, then an atomic ``os.replace``);
3. reads the file back and compares it to the source right before executing;
4. compiles the in-memory source (``compile(source, path, "exec")``) into a fresh module with
   ``__file__ = path``, after seeding ``linecache`` with the same lines. No import machinery
   is involved, so no ``__pycache__/*.pyc`` is read or written, and a file or bytecode
   planted in the folder never runs.

The folder (``$SPARSE_PLANNER_CACHE`` or ``~/.cache/sparse_planner``) is created with mode
0o700 and refused when another user owns it or group/others may write to it. Loading is
thread-safe: one build per source, under a per-source lock; other threads wait for it.

Example::

    >>> mod = load("ANSWER = 42\\n")
    >>> mod.ANSWER, mod.__file__.endswith(".py")
    (42, True)
    >>> load("ANSWER = 42\\n") is mod
    True
"""
from __future__ import annotations

import hashlib
import linecache
import os
import secrets
import stat
import sys
import threading
import types
import warnings
from pathlib import Path
from typing import Optional, Union

from runtime.env import CACHE_ENV, cache_root



def source_key(source: str) -> str:
    """SHA-256 hex digest of the source's UTF-8 text: the name of its file (64 characters).

    >>> source_key("x = 1\\n")[:12]
    '9e26bf369911'
    """
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def _posix() -> bool:
    return hasattr(os, "getuid")


def check_private_dir(path: Path, uid: Optional[int] = None) -> None:
    """Raise ``PermissionError`` unless ``path`` is a folder owned by ``uid`` (default: this
    process's user) that neither group nor others may write to. No check without POSIX owners."""
    if not _posix():
        return
    uid = os.getuid() if uid is None else uid
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"kernel cache {path} is not a folder; set {CACHE_ENV} to a "
                                 "private folder")
    if st.st_uid != uid:
        raise PermissionError(
            f"kernel cache folder {path} is owned by uid {st.st_uid}, expected uid {uid} (this "
            f"user): files in it could run as your code. Set {CACHE_ENV} to a private folder "
            "of your own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(
            f"kernel cache folder {path} has mode {stat.S_IMODE(st.st_mode):#o}, writable by "
            f"group or others (files in it could run as your code); expected no group/other "
            f"write bit: run `chmod 700 {path}` or set {CACHE_ENV} to a private folder")


def cache_dir() -> Path:
    """Where rendered kernel sources live: ``$SPARSE_PLANNER_CACHE`` or
    ``~/.cache/sparse_planner``, created with mode 0o700, checked by ``check_private_dir``,
    symlinks resolved (so the checked folder is the one written to)."""
    p = Path(cache_root())
    if not p.exists():
        p.mkdir(mode=0o700, parents=True, exist_ok=True)
    p = p.resolve()
    check_private_dir(p)
    return p


_MISSING = object()   # what _read_trusted returns when there is no file


def _read_trusted(path: Path) -> Union[bytes, None, object]:
    """Bytes of ``path`` if it is a regular file (not a link) owned by this user and not
    writable by group/others; ``_MISSING`` if there is no file; ``None`` if it fails a check."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return _MISSING
    except OSError:   # a symlink (ELOOP), unreadable
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        if _posix() and (st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
            return None
        return f.read()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a new, uniquely named file beside ``path`` (mode 0o600), then rename it
    over ``path``: readers see the old file or the whole new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}."
                         f"{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class KernelLoader:
    """Map from rendered source to its executed module (see module docstring).

    ``directory``: the folder for the files (checked by ``check_private_dir``); ``None``: the
    ``cache_dir()`` of the moment. Counters: ``modules`` built, files ``written``, valid files
    ``reused``, files ``replaced`` because their text, owner, mode or type was wrong.
    """

    def __init__(self, directory: Optional[os.PathLike] = None) -> None:
        self._directory = None if directory is None else Path(directory)
        self._modules: dict[str, types.ModuleType] = {}
        self._key_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self.counts = {"modules": 0, "written": 0, "reused": 0, "replaced": 0}

    def directory(self) -> Path:
        if self._directory is None:
            return cache_dir()
        check_private_dir(self._directory)
        return self._directory

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    def load(self, source: str) -> types.ModuleType:
        """The module that executing ``source`` gives; built once per source text."""
        key = source_key(source)
        with self._lock:
            module = self._modules.get(key)
            if module is not None:
                return module
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                module = self._modules.get(key)
            if module is None:
                module = self._build(key, source)
                with self._lock:
                    self._modules[key] = module
                    self._key_locks.pop(key, None)
            return module

    def _build(self, key: str, source: str) -> types.ModuleType:
        path = self.directory() / f"{key}.py"
        data = source.encode("utf-8")
        on_disk = _read_trusted(path)
        if on_disk == data:
            self._count("reused")
        else:
            if on_disk is not _MISSING:
                self._count("replaced")
                warnings.warn(f"kernel file {path} did not hold the source of its name (wrong "
                              "text, owner, mode or file type); writing it again",
                              RuntimeWarning, stacklevel=4)
            _write_atomic(path, data)
            self._count("written")
        # what Triton will read back must be what runs: verify right before executing
        if _read_trusted(path) != data:
            raise RuntimeError(
                f"kernel file {path} changed while it was being loaded (expected the {len(data)} "
                f"bytes of source sha256 {key}): something else is writing this folder; "
                f"set {CACHE_ENV} to a private folder")
        filename = str(path)
        # inspect/linecache (Triton's view of the kernel source) get the verified text; an
        # entry without mtime is never invalidated against the file by linecache.checkcache
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        name = f"sparse_planner_kernels_{key[:24]}"
        module = types.ModuleType(name)
        module.__file__ = filename
        code = compile(source, filename, "exec", dont_inherit=True)
        sys.modules[name] = module
        try:
            exec(code, module.__dict__)
        except Exception as e:
            sys.modules.pop(name, None)
            raise RuntimeError(f"rendered kernel module {path} failed to execute: {e}") from e
        self._count("modules")
        return module

    def stats(self) -> dict:
        """The counters (see the class docstring) and ``entries``: modules held."""
        with self._lock:
            return dict(self.counts, entries=len(self._modules))


# The process-wide loader of rendered kernel modules.
LOADER = KernelLoader()


def load(source: str) -> types.ModuleType:
    """Execute rendered kernel ``source`` as a module (once per text; see module docstring)."""
    return LOADER.load(source)
