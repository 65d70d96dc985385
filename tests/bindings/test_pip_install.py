"""`pip install ./bindings/python` as a user runs it: into a fresh virtual environment (no
system site-packages), with no DINO_BRIDGE_LIB and no PYTHONPATH, the install builds the
Rust library with cargo (setuptools-rust) and puts it inside the installed package, whose
`Bridge` then loads it from there and runs; the source tree is left as it was (no build/,
no *.egg-info, no library copied into bindings/python).

Cargo builds into the repository's own target directory (or $CARGO_TARGET_DIR), so after
the `cargo build --release --lib` that scripts/test-all runs first it compiles nothing and
the test takes about 20 s, mostly pip fetching numpy and the build requirements from PyPI.
With a stale target directory it compiles the crate first, as `cargo build --release`
would."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_SRC = ROOT / "bindings" / "python"

pytestmark = pytest.mark.skipif(
    shutil.which("cargo") is None,
    reason="cargo is not on PATH: `pip install ./bindings/python` builds the Rust library with it",
)


def _git_status(*args) -> set:
    """`git status --porcelain` lines, or an empty set outside a git checkout."""
    if shutil.which("git") is None:
        return set()
    r = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", *args], capture_output=True, text=True)
    return set(r.stdout.splitlines()) if r.returncode == 0 else set()


def _source_files() -> set:
    """Every file and directory under bindings/python but Python's and pytest's caches."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(PACKAGE_SRC):
        dirnames[:] = [d for d in dirnames if d not in ("__pycache__", ".pytest_cache")]
        rel = Path(dirpath).relative_to(PACKAGE_SRC)
        found.update(str(rel / name) for name in dirnames + filenames)
    return found


def _tree_state() -> dict:
    return {
        "git status": _git_status(),
        # ignored files too, under the package source (a stray build/ or library there)
        "git status --ignored (bindings/python)": _git_status("--ignored", "--", str(PACKAGE_SRC)),
        "files under bindings/python": _source_files(),
    }


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DINO_BRIDGE_LIB", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(extra)
    return env


CHECK = textwrap.dedent("""
    import json, os, sys
    from importlib import metadata
    from pathlib import Path

    import numpy as np

    assert "DINO_BRIDGE_LIB" not in os.environ
    import dino_bridge
    from dino_bridge import _lib as L

    bridge = dino_bridge.Bridge(in_ch=4, latent_size=16, grid=4, target_dim=48, adapter_mid_channels=32,
                                adapter_out_channels=64, width=64, depth=2, heads=4)
    latents = np.random.default_rng(0).standard_normal((2, 4, 16, 16)).astype(np.float32)
    tokens = bridge.forward(latents)
    bridge.close()
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    dist = metadata.distribution("dino-bridge")
    print(json.dumps({
        "package": str(Path(dino_bridge.__file__).resolve().parent),
        "prefix": str(Path(sys.prefix).resolve()),
        "library_path": str(L.library_path().resolve()),
        "loaded": str(Path(L.lib()._name).resolve()),
        "mapped": sorted({line.split(None, 5)[-1] for line in maps.splitlines() if "libdino_bridge" in line}),
        "tokens": list(tokens.shape),
        "finite": bool(np.isfinite(tokens).all()),
        "extras": dist.metadata.get_all("Provides-Extra") or [],
        "requires": dist.requires or [],
    }))
""")

OVERRIDE = textwrap.dedent("""
    import sys
    from dino_bridge import _lib as L
    assert str(L.library_path()) == sys.argv[1], L.library_path()
    try:
        L.lib()
    except OSError as e:
        assert sys.argv[1] in str(e), e
    else:
        raise AssertionError("a DINO_BRIDGE_LIB that does not exist was not refused")
""")


def test_pip_install_builds_the_library_into_the_package(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300, env=_clean_env())
    python = venv / "bin" / "python"

    before = _tree_state()
    target = os.environ.get("CARGO_TARGET_DIR") or str(ROOT / "target")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", str(PACKAGE_SRC)],
        capture_output=True, text=True, timeout=1800, cwd=tmp_path, env=_clean_env(CARGO_TARGET_DIR=target))
    after = _tree_state()
    assert install.returncode == 0, f"pip install failed:\n{install.stdout[-6000:]}\n{install.stderr[-6000:]}"
    for what in before:
        new = after[what] - before[what]
        assert not new, f"pip install left {sorted(new)} in the source tree ({what})"

    run = subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=_clean_env())
    assert run.returncode == 0, f"the installed package failed:\n{run.stdout}\n{run.stderr}"
    got = json.loads(run.stdout.strip().splitlines()[-1])

    package = Path(got["package"])
    assert package.is_relative_to(Path(got["prefix"])) and not package.is_relative_to(ROOT), \
        f"imported {package}, not the installed package"
    assert Path(got["library_path"]) == package / "libdino_bridge.so"
    assert Path(got["loaded"]) == package / "libdino_bridge.so"
    if got["mapped"] or Path("/proc/self/maps").exists():
        assert got["mapped"] == [str(package / "libdino_bridge.so")], got["mapped"]
    assert got["tokens"] == [2, 16, 48] and got["finite"]
    # the optional dependencies of `pip install ./bindings/python[prepare]` are still declared
    assert "prepare" in got["extras"]
    assert any(r.startswith("torch") and "prepare" in r for r in got["requires"]), got["requires"]

    # DINO_BRIDGE_LIB still overrides the bundled library
    missing = str(tmp_path / "no" / "libdino_bridge.so")
    override = subprocess.run([str(python), "-c", OVERRIDE, missing], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path, env=_clean_env(DINO_BRIDGE_LIB=missing))
    assert override.returncode == 0, f"{override.stdout}\n{override.stderr}"
