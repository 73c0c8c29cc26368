"""The Keras backend's own TensorFlow op (LSQ's per-tensor backward pass), compiled from C++ on first use.

TensorFlow's ops cannot fuse LSQ's parameter-gradient sums with its fake-quant gradient op, and on the CPU those
extra passes over every activation are most of what an LSQ step costs beyond an STE one. `kernels/lsq_gradient.cc`
does the gradient op's work and the sums in one pass. It is built with the C++ compiler against the installed
TensorFlow's headers (`tf.sysconfig`) the first time an LSQ quantizer computes a gradient, and cached per
TensorFlow build and source (`$TRAINABLE_INFRA_CACHE_DIR`, else `$XDG_CACHE_HOME/trainable_infra` or
`~/.cache/trainable_infra`). Where it cannot be built (no compiler, no headers) the quantizers keep TensorFlow's
ops, with one warning; `TRAINABLE_INFRA_NATIVE_OPS=0` turns the op off; so do a GPU (the op has a CPU kernel
only) and XLA (no kernel there). Both paths give the same input gradient bit for bit and the same parameter
gradients up to the order of float summation.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

import tensorflow as tf

SOURCE = Path(__file__).with_name("kernels") / "lsq_gradient.cc"
DISABLE_ENV = "TRAINABLE_INFRA_NATIVE_OPS"
CACHE_ENV = "TRAINABLE_INFRA_CACHE_DIR"
# -ffp-contract=off: no fused multiply-add where the gradient op rounds a product (GCC contracts by default).
_FLAGS = ("-shared", "-fPIC", "-O3", "-ffp-contract=off")


class NativeOpBuildError(RuntimeError):
    """The op could not be compiled or loaded; the message holds the compiler's output."""


def cache_dir() -> Path:
    """Where compiled ops are kept."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "trainable_infra"
    try:
        return Path.home() / ".cache" / "trainable_infra"
    except (RuntimeError, KeyError):  # no HOME and no passwd entry (some containers)
        return Path(tempfile.gettempdir()) / f"trainable_infra-{os.getuid()}"


def compiler() -> str | None:
    """The C++ compiler to build with: `$CXX` (a command line, e.g. "ccache g++"), else `c++` or `g++`."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def build_command(cxx: str, output: Path) -> list[str]:
    """The compiler command that builds the op library at `output` against the installed TensorFlow."""
    return [*shlex.split(cxx), *_FLAGS, str(SOURCE), "-o", str(output), *tf.sysconfig.get_compile_flags(),
            *tf.sysconfig.get_link_flags()]


@functools.cache
def _compiler_version(cxx: str) -> str:
    try:
        result = subprocess.run([*shlex.split(cxx), "--version"], capture_output=True, text=True, check=False)
    except OSError:
        return ""
    return result.stdout


def library_path(cxx: str) -> Path:
    """The cached library for this source, TensorFlow build, compiler and machine."""
    key = "\n".join([SOURCE.read_text(), tf.version.VERSION, tf.version.GIT_VERSION, *build_command(cxx, Path()),
                     _compiler_version(cxx), platform.machine(), sys.platform])
    return cache_dir() / f"lsq_gradient-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def build(cxx: str) -> Path:
    """The op library, compiled into the cache unless it is there already (one process builds at a time)."""
    path = library_path(cxx)
    if path.exists():  # it only ever appears whole (renamed into place): no lock needed, a read-only cache works
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        with contextlib.suppress(ImportError):  # no fcntl (Windows): concurrent builds rename over each other
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return path
        # Built beside its final name and renamed into place, so that no process ever loads a partial file.
        fd, partial = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            result = subprocess.run(build_command(cxx, Path(partial)), capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise NativeOpBuildError(
                    f"{cxx} exited with {result.returncode}: {(result.stderr or result.stdout).strip()[-2000:]}"
                )
            os.chmod(partial, 0o755)  # mkstemp made it private: others sharing the cache must be able to load it
            os.replace(partial, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial)
    return path


@functools.cache
def ops() -> ModuleType | None:
    """The loaded op library, or None where it is turned off, cannot run here or cannot be built."""
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    # The op has a CPU kernel only: beside a GPU, TensorFlow would copy every activation to the host for it.
    if sys.platform == "win32" or tf.config.list_physical_devices("GPU"):
        return None
    cxx = compiler()
    try:
        if cxx is None:
            raise NativeOpBuildError("no C++ compiler found (set CXX or install g++)")
        return tf.load_op_library(str(build(cxx)))
    except (NativeOpBuildError, OSError, tf.errors.OpError) as exc:
        warnings.warn(
            f"trainable_infra: LSQ's fused gradient op could not be built, so LSQ quantizers use TensorFlow's ops "
            f"(the same gradients up to the order of float summation, a slower backward pass; {DISABLE_ENV}=0 "
            f"silences this): {exc}",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def compiled_by_xla() -> bool:
    """Whether the graph being traced is compiled by XLA, which has no kernel for the op."""
    try:
        from tensorflow.python.framework import ops as tf_ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - moved in some TensorFlow release
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf_ops.get_default_graph()))


def lsq_gradient(
    dy: tf.Tensor, x: tf.Tensor, y: tf.Tensor, low: tf.Tensor, high: tf.Tensor, n_bits: int
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor] | None:
    """(input gradient, Σ dy below the range, Σ dy above it, Σ dx·(y − x)) of per-tensor float32 tensors in one
    op, NaN for the last where x holds a NaN; None where the op cannot run here (use TensorFlow's ops)."""
    library = None if compiled_by_xla() else ops()
    if library is None:
        return None
    return library.trainable_infra_fake_quant_lsq_gradient(dy, x, y, low, high, num_bits=n_bits)
