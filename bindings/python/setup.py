"""`pip install ./bindings/python` builds the crate two levels up (`cargo rustc --lib
--release`, setuptools-rust without Python bindings: the library is a plain C-ABI cdylib
that `dino_bridge._lib` loads with ctypes) and installs it as
`dino_bridge/libdino_bridge.so`, where `library_path()` looks when `$DINO_BRIDGE_LIB` is
unset. The package's metadata is in pyproject.toml; this file only adds the Rust build.

Cargo builds into its usual target directory (`target/` at the repository root, or
`$CARGO_TARGET_DIR`), so after `cargo build --release` the install compiles nothing."""

import atexit
import os
import shutil
import tempfile

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools_rust import Binding, RustExtension

HERE = os.path.dirname(os.path.abspath(__file__))
LIB_MODULE = "dino_bridge.libdino_bridge"


class build_ext_plain_library(build_ext):
    """The library keeps its plain name: setuptools-rust asks build_ext where the artifact
    goes, and build_ext would name it like a Python extension module
    (`libdino_bridge.cpython-311-x86_64-linux-gnu.so`), which it is not."""

    def get_ext_filename(self, ext_name):
        if ext_name in (LIB_MODULE, LIB_MODULE.rsplit(".", 1)[1]):
            return os.path.join(*ext_name.split(".")) + ".so"
        return super().get_ext_filename(ext_name)


# pip builds a local directory in place, and setuptools would then leave `build/` and
# `dino_bridge.egg-info/` in this source tree. They go to a scratch directory instead, removed
# when this build process exits: nothing in them is worth keeping between builds (the slow
# part, cargo's compilation, is cached in cargo's own target directory), and steering them
# away, rather than deleting them afterwards, also leaves alone a `build/` the user made on
# purpose and works in a read-only checkout. `--build-base` / `--egg-base` on the command
# line or in setup.cfg still override this (setup()'s options rank lowest).
_scratch = tempfile.mkdtemp(prefix="dino-bridge-build-")
atexit.register(shutil.rmtree, _scratch, True)

setup(
    rust_extensions=[
        RustExtension(
            LIB_MODULE,
            path=os.path.join(HERE, "..", "..", "Cargo.toml"),
            binding=Binding.NoBinding,
            debug=False,  # release, also for in-place builds
            # The manifest's own crate types (setuptools-rust would pass `--crate-type cdylib`):
            # the same set gives the same cargo fingerprint as `cargo build --release`, whose
            # library is then reused as is instead of the crate being compiled again.
            args=["--crate-type", "cdylib,rlib"],
        )
    ],
    cmdclass={"build_ext": build_ext_plain_library},
    options={
        "build": {"build_base": os.path.join(_scratch, "build")},
        "egg_info": {"egg_base": _scratch},
    },
)
