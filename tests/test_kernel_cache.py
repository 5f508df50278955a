"""The kernel cache folder and loader: only the source the planner rendered ever runs, and
first use from many threads builds each kernel once without errors."""
import importlib.util
import marshal
import os
import stat
import threading
import time

import pytest
import torch

from runtime.cache import KernelCache
from runtime.loader import CACHE_ENV, KernelLoader, cache_dir, check_private_dir, source_key


@pytest.fixture
def private(tmp_path):
    d = tmp_path / "kernels"
    d.mkdir(mode=0o700)
    return d


def _marker_code(marker) -> str:
    """Source that, if it ever runs, leaves a file at ``marker``."""
    return f"open({str(marker)!r}, 'w').write('ran')\nVALUE = 'planted'\n"


def _plant_pyc(py_path: str, code_text: str) -> str:
    """A timestamp-checked .pyc for ``py_path`` whose header matches the file's mtime and size
    (what the import system checks), holding ``code_text`` instead of the file's code."""
    st = os.stat(py_path)
    header = (importlib.util.MAGIC_NUMBER + (0).to_bytes(4, "little")
              + (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little")
              + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little"))
    pyc = importlib.util.cache_from_source(py_path)
    os.makedirs(os.path.dirname(pyc), exist_ok=True)
    with open(pyc, "wb") as f:
        f.write(header + marshal.dumps(compile(code_text, py_path, "exec")))
    return pyc


def _import_from_file(path: str):
    """How the kernel modules used to be loaded (the import system, which prefers a .pyc)."""
    spec = importlib.util.spec_from_file_location("sp_test_planted", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- planted files

def test_planted_pyc_never_runs(private, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(private))
    src = "VALUE = 'verified'\n"
    path = KernelLoader().load(src).__file__
    marker = tmp_path / "pyc_ran"
    _plant_pyc(path, _marker_code(marker))
    # the planted bytecode is valid: the import system runs it instead of the file's text
    assert _import_from_file(path).VALUE == "planted" and marker.exists()
    marker.unlink()

    loader = KernelLoader()          # a new process's loader, same folder
    mod = loader.load(src)
    assert mod.VALUE == "verified"
    assert not marker.exists(), "the planted .pyc ran"
    assert loader.stats() == {"modules": 1, "written": 0, "reused": 1, "replaced": 0, "entries": 1}
    pycache = os.path.join(private, "__pycache__")
    assert os.listdir(pycache) == [os.path.basename(importlib.util.cache_from_source(path))], \
        "the loader wrote bytecode"


def _plant_wrong_text(path, marker, tmp_path):
    path.write_text(_marker_code(marker))


def _plant_right_text_group_writable(path, marker, tmp_path):
    path.write_text("VALUE = 'verified'\n")
    os.chmod(path, 0o664)


def _plant_symlink_to_right_text(path, marker, tmp_path):
    target = tmp_path / "elsewhere.py"
    target.write_text("VALUE = 'verified'\n")
    os.symlink(target, path)


def _plant_right_text_other_owner(path, marker, tmp_path):
    if os.getuid() != 0:
        pytest.skip("needs root to give a file to another user")
    path.write_text("VALUE = 'verified'\n")
    os.chown(path, 65534, 65534)


@pytest.mark.parametrize("plant", [
    pytest.param(_plant_wrong_text, id="wrong-text"),
    pytest.param(_plant_right_text_group_writable, id="group-writable"),
    pytest.param(_plant_symlink_to_right_text, id="symlink"),
    pytest.param(_plant_right_text_other_owner, id="other-owner"),
])
def test_planted_py_is_replaced_not_run(private, tmp_path, plant):
    src = "VALUE = 'verified'\n"
    path = private / f"{source_key(src)}.py"
    marker = tmp_path / "py_ran"
    plant(path, marker, tmp_path)
    loader = KernelLoader(private)
    with pytest.warns(RuntimeWarning, match="did not hold the source of its name"):
        mod = loader.load(src)
    assert mod.VALUE == "verified" and not marker.exists()
    assert loader.stats() == {"modules": 1, "written": 1, "reused": 0, "replaced": 1, "entries": 1}
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid() and path.read_text() == src
    if plant is _plant_symlink_to_right_text:
        assert (tmp_path / "elsewhere.py").read_text() == src   # the link's target untouched


def test_file_changed_before_execution_is_an_error(private, tmp_path, monkeypatch):
    # another writer replaces the file between this loader's write and its check
    import runtime.loader as loader_mod
    marker = tmp_path / "changed_ran"
    real_write = loader_mod._write_atomic

    def write_then_overwritten(path, data):
        real_write(path, data)
        real_write(path, _marker_code(marker).encode())

    monkeypatch.setattr(loader_mod, "_write_atomic", write_then_overwritten)
    src = "VALUE = 'verified'\n"
    with pytest.raises(RuntimeError, match=f"{source_key(src)}.py changed while it was being loaded"):
        KernelLoader(private).load(src)
    assert not marker.exists()


def test_module_failing_to_execute(private):
    loader = KernelLoader(private)
    src = "VALUE = 1\nraise ValueError('bad kernel text')\n"
    with pytest.raises(RuntimeError, match=r"failed to execute: bad kernel text"):
        loader.load(src)
    assert not any(m.startswith(f"sparse_planner_kernels_{source_key(src)[:24]}")
                   for m in list(__import__("sys").modules))
    with pytest.raises(RuntimeError, match="bad kernel text"):   # not cached as loaded
        loader.load(src)
    assert loader.stats()["entries"] == 0


# ----------------------------------------------------------------------------- Triton's view

KERNEL = '''import triton
import triton.language as tl


@triton.jit
def add_const(X, Y, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + i, mask=i < N)
    tl.store(Y + i, x + ADD, mask=i < N)
'''


def test_triton_kernel_runs_the_verified_text(private):
    src = KERNEL.replace("ADD", "1.5")
    mod = KernelLoader(private).load(src)
    # the file on disk changes after loading; Triton compiles from the source it was given
    with open(mod.__file__, "w") as f:
        f.write(KERNEL.replace("ADD", "100.0") + "\n# edited\n")
    x = torch.randn(37)
    y = torch.full_like(x, float("nan"))
    mod.add_const[(3,)](x, y, 37, BLOCK=16)
    torch.testing.assert_close(y, x + 1.5, rtol=0, atol=0)


# ----------------------------------------------------------------------------- the folder

@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702], ids=["world-writable", "group-writable",
                                                           "other-writable"])
def test_writable_folder_is_refused(tmp_path, monkeypatch, mode):
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, mode)
    monkeypatch.setenv(CACHE_ENV, str(d))
    with pytest.raises(PermissionError, match=rf"{d}.*mode {oct(mode)}.*chmod 700 {d}"):
        cache_dir()
    with pytest.raises(PermissionError, match=CACHE_ENV):
        KernelLoader().load("VALUE = 1\n")
    assert os.listdir(d) == []


def test_symlink_to_writable_folder_is_refused(tmp_path, monkeypatch):
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o777)
    os.symlink(d, tmp_path / "link")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "link"))
    with pytest.raises(PermissionError, match=f"{d}"):
        cache_dir()


def test_folder_of_another_user_is_refused(private):
    with pytest.raises(PermissionError, match=rf"owned by uid {os.getuid()}, expected uid "
                                              rf"{os.getuid() + 1}.*{CACHE_ENV}"):
        check_private_dir(private, uid=os.getuid() + 1)
    check_private_dir(private)
    if os.getuid() == 0:      # a real folder of another user (root can hand one over)
        os.chown(private, 65534, 65534)
        with pytest.raises(PermissionError, match=f"{private} is owned by uid 65534"):
            KernelLoader(private).load("VALUE = 1\n")


def test_cache_dir_is_created_private(tmp_path, monkeypatch):
    d = tmp_path / "new" / "kernels"
    monkeypatch.setenv(CACHE_ENV, str(d))
    old = os.umask(0o002)
    try:
        assert cache_dir() == d.resolve()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert KernelLoader().load("VALUE = 7\n").VALUE == 7


# ----------------------------------------------------------------------------- threads

def _hammer(n_threads, trials, load_for_thread):
    """``trials`` rounds of ``n_threads`` threads that load the same new source at once."""
    errors, results = [], [[None] * n_threads for _ in range(trials)]
    barrier = threading.Barrier(n_threads)

    def work(t):
        for r in range(trials):
            barrier.wait()
            try:
                results[r][t] = load_for_thread(t)(f"VALUE = {r}\nTAG = {t * 0}\n# round {r}\n")
            except Exception as e:   # noqa: BLE001  (every error is a failure, counted below)
                errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return errors, results


def test_threads_load_new_sources_once(private):
    loader = KernelLoader(private)
    errors, results = _hammer(8, 200, lambda t: loader.load)
    assert errors == []
    for r, mods in enumerate(results):
        assert all(m is mods[0] for m in mods) and mods[0].VALUE == r
    assert loader.stats() == {"modules": 200, "written": 200, "reused": 0, "replaced": 0,
                              "entries": 200}
    names = sorted(os.listdir(private))
    assert len(names) == 200 and all(n.endswith(".py") for n in names)   # no temp file left


def test_loaders_sharing_a_folder_race_safely(private):
    # one loader per thread: the writes race as separate processes' would
    loaders = [KernelLoader(private) for _ in range(8)]
    errors, results = _hammer(8, 50, lambda t: loaders[t].load)
    assert errors == []
    for r, mods in enumerate(results):
        assert [m.VALUE for m in mods] == [r] * 8
    assert all(ld.stats()["modules"] == 50 for ld in loaders)
    assert sum(ld.stats()["written"] + ld.stats()["reused"] for ld in loaders) == 8 * 50
    assert sum(ld.stats()["replaced"] for ld in loaders) == 0
    names = os.listdir(private)
    assert len(names) == 50 and all(n.endswith(".py") for n in names)
    for n in names:
        assert source_key((private / n).read_text()) == n[:-3]


def test_kernel_cache_builds_once_per_key_across_threads():
    cache = KernelCache()
    keys, n_threads = 40, 8
    builds = {k: 0 for k in range(keys)}
    count_lock = threading.Lock()
    barrier = threading.Barrier(n_threads)
    got, errors = [[None] * keys for _ in range(n_threads)], []

    def build_for(k):
        def build():
            with count_lock:
                builds[k] += 1
            time.sleep(0.001)      # a slow build: the other threads arrive while it runs
            return ("kernel", k, object())
        return build

    def work(t):
        try:
            for k in range(keys):
                barrier.wait()
                got[t][k] = cache.get(("toy", k), build_for(k))
        except Exception as e:   # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert builds == {k: 1 for k in range(keys)}
    for k in range(keys):
        assert all(got[t][k] is got[0][k] for t in range(n_threads)) and got[0][k][1] == k
    assert cache.stats() == {"hits": keys * (n_threads - 1), "misses": keys, "compiles": keys,
                             "entries": keys}


def test_kernel_cache_failed_build_is_retried():
    cache = KernelCache()
    with pytest.raises(ZeroDivisionError):
        cache.get("k", lambda: 1 / 0)
    assert cache.get("k", lambda: "ok") == "ok" and cache.get("k", lambda: "again") == "ok"
    assert cache.stats() == {"hits": 1, "misses": 2, "compiles": 1, "entries": 1}
