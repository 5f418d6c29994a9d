"""models/packed.py: building, caching and loading the kernel library, and what the cache trusts.

One real build per module (`prebuilt`, by the machine's compiler named in two words as ccache's
users name it); every other build is a stand-in compiler's (`stand_in`) that copies it, prints
nothing, sleeps or fails, so the tests run the loader's every path in milliseconds.
"""

import ctypes
import os
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import jax
import pytest

from models import packed

PLANTED_SOURCE = """
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
  const char* marker = getenv("SEQZOO_TEST_MARKER");
  FILE* f = marker ? fopen(marker, "w") : NULL;
  if (f) fclose(f);
}
"""


@pytest.fixture(scope="module")
def prebuilt(tmp_path_factory) -> Path:
    """The kernel library, built once by `CXX="env c++"` in a private cache of its own."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("SEQZOO_CACHE", str(cache))
        m.setenv("CXX", "env c++")
        assert hasattr(packed._library(), packed.ENTRY)
    [library] = cache.glob("*.so")
    return library


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """A library without the kernel whose constructor creates the file `$SEQZOO_TEST_MARKER`."""
    library = tmp_path_factory.mktemp("planted") / "planted.so"
    command = ["c++", "-shared", "-fPIC", "-x", "c++", "-", "-o", str(library)]
    subprocess.run(command, input=PLANTED_SOURCE, text=True, check=True, timeout=60)
    return library


def stand_in(folder: Path, build: str, version: str = "stand-in 1.0") -> str:
    """A stand-in C++ compiler (a shell script in `folder`): `--version` prints `version`; a build
    appends a line to `folder/builds` and runs the shell command `build` with `$out` the -o path."""
    script = folder / "cxx"
    script.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = --version ] && {{ echo "{version}"; exit 0; }}\n'
        'while [ $# -gt 1 ]; do [ "$1" = -o ] && out=$2; shift; done\n'
        f'echo build >> "{folder}/builds"\n'
        f"{build}\n"
    )
    script.chmod(0o700)
    return str(script)


def builds(folder: Path) -> int:
    """How many builds the stand-in in `folder` has run."""
    log = folder / "builds"
    return len(log.read_text().splitlines()) if log.exists() else 0


def attempt(load, **env) -> tuple:
    """`load()` under the environment variables `env`: its answer and the warnings it gave."""
    with pytest.MonkeyPatch.context() as m, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, value in env.items():
            m.setenv(name, str(value))
        answer = load()
    return answer, [str(w.message) for w in caught]


def load(**env) -> tuple[bool, list[str]]:
    """Whether the kernel library loads under `env` (built, cached, or from a private temporary
    folder) with the kernel in it, and the warnings it gave. (`packed.available()` registers the
    kernel with XLA too, which a process does once.)"""
    library, warned = attempt(packed._library, **env)
    return hasattr(library, packed.ENTRY), warned


def fall_back(**env) -> tuple[bool | str, list[str]]:
    """A fresh `packed.available()` (uncached) under `env` where it fails: why, and its warnings."""
    return attempt(packed.available.__wrapped__, **env)


@pytest.fixture
def copying(tmp_path, prebuilt) -> dict:
    """The environment of a private cache `tmp_path/cache` and a stand-in that copies `prebuilt`."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    return {"SEQZOO_CACHE": cache, "CXX": stand_in(tmp_path, f'cp "{prebuilt}" "$out"')}


def cached(env: dict) -> Path:
    """The one library in `env`'s cache."""
    [library] = Path(env["SEQZOO_CACHE"]).glob("*.so")
    return library


def built(env: dict) -> Path:
    """The library built into `env`'s cache under the name `packed._library()` looks for, not
    loaded (this process would load a second library at a path it loaded before as the first)."""
    with pytest.MonkeyPatch.context() as m:
        for name, value in env.items():
            m.setenv(name, str(value))
        compiler = packed._compiler()
        library = packed._cache_dir() / f"packed_matmul-{packed._key(compiler)}.so"
        packed._compile(compiler, library)
    return library


def replace(library: Path, content: bytes) -> None:
    """`library` replaced by a new file holding `content`."""
    new = library.with_name("new")
    new.write_bytes(content)
    new.replace(library)


def test_a_compiler_named_in_two_words_builds_a_library_with_the_kernel(prebuilt):
    """`CXX="ccache g++"` is split as a shell splits it (here `env c++`, which `prebuilt` used)."""
    assert prebuilt.name.startswith("packed_matmul-")
    assert hasattr(ctypes.CDLL(str(prebuilt)), packed.ENTRY)


def test_the_cache_folder_and_library_are_private_to_the_user(tmp_path, copying):
    cache = tmp_path / "new" / "cache"
    assert load(**{**copying, "SEQZOO_CACHE": cache}) == (True, [])
    assert cache.stat().st_mode & 0o777 == 0o700
    library = cached({"SEQZOO_CACHE": cache})
    assert library.stat().st_uid == os.geteuid() and library.stat().st_mode & 0o077 == 0


def test_the_build_is_cached(tmp_path, copying):
    assert load(**copying) == (True, [])
    built = cached(copying).stat().st_mtime_ns
    assert load(**copying) == (True, []) and builds(tmp_path) == 1
    assert cached(copying).stat().st_mtime_ns == built


def foreign(path: Path) -> None:
    os.chown(path, 65534, 65534)  # nobody's


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")


@pytest.mark.parametrize(
    "change, folder",
    [
        (lambda cache, library: cache.chmod(0o777), True),
        (lambda cache, library: cache.chmod(0o770), True),
        pytest.param(lambda cache, library: foreign(cache), True, marks=needs_root),
        (lambda cache, library: library.chmod(0o722), False),
        pytest.param(lambda cache, library: foreign(library), False, marks=needs_root),
    ],
    ids=[
        "world-writable folder",
        "group-writable folder",
        "foreign folder",
        "library others can write",
        "foreign library",
    ],
)
def test_a_library_others_could_have_planted_is_never_loaded(
    tmp_path, copying, planted, prebuilt, change, folder
):
    """A library at the cache's name whose constructor leaves a marker: in a folder others can
    write (or own), the kernel is built into a private temporary folder and the cache is left as
    it is; a library others can write (or own) in the user's own folder is replaced by a build."""
    library = built(copying)
    replace(library, planted.read_bytes())
    change(copying["SEQZOO_CACHE"], library)
    marker = tmp_path / "marker"
    answer, warned = load(**copying, SEQZOO_TEST_MARKER=marker)
    assert answer is True and not marker.exists()
    assert builds(tmp_path) == 2
    if folder:
        assert len(warned) == 1 and "building into a private temporary folder" in warned[0]
        assert library.read_bytes() == planted.read_bytes()  # not touched, not loaded
    else:
        assert warned == [] and library.read_bytes() == prebuilt.read_bytes()
        assert library.stat().st_uid == os.geteuid() and library.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("damage", ["empty", "without the kernel"])
def test_a_cached_library_that_does_not_load_is_rebuilt_once(
    tmp_path, copying, planted, prebuilt, damage
):
    library = built(copying)
    replace(library, b"" if damage == "empty" else planted.read_bytes())
    assert load(**copying) == (True, [])
    assert builds(tmp_path) == 2 and library.read_bytes() == prebuilt.read_bytes()


@pytest.mark.parametrize("output", [": > $out", f'cp "{__file__}" "$out"'], ids=["empty", "text"])
def test_a_rebuild_that_does_not_load_either_falls_back_with_one_warning(tmp_path, output):
    cache = tmp_path / "cache"
    answer, warned = fall_back(SEQZOO_CACHE=cache, CXX=stand_in(tmp_path, output))
    assert answer.startswith("packed kernels off:") and "does not load" in answer
    assert len(warned) == 1 and "does not load" in warned[0] and "\n" not in warned[0]
    assert builds(tmp_path) == 2 and not list(cache.glob("*.so"))


def test_a_hung_build_is_stopped_after_the_timeout(tmp_path, monkeypatch):
    """The compiler and everything it started are killed (the pipes close at once)."""
    monkeypatch.setattr(packed, "BUILD_TIMEOUT_S", 1.0)
    cxx = stand_in(tmp_path, "sleep 120")
    start = time.monotonic()
    answer, warned = fall_back(SEQZOO_CACHE=tmp_path / "cache", CXX=cxx)
    assert time.monotonic() - start < 30
    assert answer.startswith("packed kernels off:") and "took over 1.0 s" in answer
    assert len(warned) == 1 and "\n" not in answer


def test_a_failed_build_names_the_compiler_and_the_first_error(tmp_path):
    cxx = stand_in(tmp_path, 'echo "x.cc:1: error: no such thing" >&2; exit 1')
    answer, warned = fall_back(SEQZOO_CACHE=tmp_path / "cache", CXX=cxx)
    assert (
        answer
        == f"packed kernels off: {cxx} failed on packed_matmul.cc: x.cc:1: error: no such thing"
    )
    assert len(warned) == 1 and not list((tmp_path / "cache").glob("*.so"))


def test_without_a_compiler_a_warning_says_why_and_nothing_is_packed(tmp_path, monkeypatch):
    answer, warned = fall_back(SEQZOO_CACHE=tmp_path, CXX="no-such-compiler")
    assert answer.startswith("packed kernels off") and "no-such-compiler" in answer
    assert len(warned) == 1 and "no-such-compiler" in warned[0]
    monkeypatch.setattr(packed, "available", lambda: answer)
    params = {"a": {"kernel": jax.numpy.ones((4, 4)), "bias": jax.numpy.zeros(4)}}
    assert packed.pack_params(params) is params


AARCH64_CPUINFO = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid {extra}
CPU implementer\t: 0x41
"""


def test_the_cache_key_follows_the_compilers_version_the_headers_content_and_the_cpu(
    tmp_path, monkeypatch
):
    def key(version="stand-in 1.0"):
        return packed._key([stand_in(tmp_path, "exit 1", version)])

    assert key() == key() and key("stand-in 2.0") != key()

    headers = tmp_path / "include"
    shutil.copytree(jax.ffi.include_dir(), headers)
    monkeypatch.setattr(jax.ffi, "include_dir", lambda: str(headers))
    before = key()
    header = sorted(headers.rglob("*.h"))[0]
    header.write_text(header.read_text() + "\n// changed\n")
    assert key() != before  # the same path, other content

    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(packed, "CPUINFO", cpuinfo)
    cpuinfo.write_text(AARCH64_CPUINFO.format(extra="sve"))
    with_sve = key()
    cpuinfo.write_text(AARCH64_CPUINFO.format(extra=""))
    assert key() != with_sve
    assert packed._cpu_features(AARCH64_CPUINFO).startswith("Features\t: fp asimd")
    assert packed._cpu_features("processor\t: 0\nflags\t\t: fpu sse2 avx512f\n") == (
        "flags\t\t: fpu sse2 avx512f"
    )
