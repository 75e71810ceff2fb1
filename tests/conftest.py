"""Test setup: CPU only, repository root importable, shared fixture folders resolvable by env var."""

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight host devices so that the mesh tests (names containing "mesh") can shard; every other test runs on
# device 0 as before. A user's own XLA_FLAGS win (the mesh tests then skip with a reason).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _share_compiles() -> None:
    """One XLA compilation cache for the whole session, this process, its xdist workers and every CLI
    subprocess: the suite compiles the same tiny samplers in dozens of places, and on 2 cores compiling is most
    of a CLI test's time. It is a fresh folder per session (removed at exit), so a run never reads what an
    earlier checkout compiled; a user's own JAX_COMPILATION_CACHE_DIR wins."""
    import atexit
    import shutil
    import tempfile

    if "JAX_COMPILATION_CACHE_DIR" not in os.environ and "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tempfile.mkdtemp(prefix="flowcache-jax-xla-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


_share_compiles()
