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
