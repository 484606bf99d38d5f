import os
from pathlib import Path

# Simulated host devices for multi-device tests; must be set before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO.parent / "shared" / "golden"


def golden_dir(kind: str) -> Path:
    """The shared fixture folder of `kind`, or a skip with the reason when ../shared/golden is absent."""
    path = GOLDEN / kind
    if not (path / "manifest.json").is_file():
        pytest.skip(f"golden fixture {path} not present (../shared/golden sits beside the checkout in CI)")
    return path


def override(config, values: dict):
    """Sets dotted keys of an ml-collections config ({"data.batch_size": 2, ...}), as --config.a.b=v would."""
    for key, value in values.items():
        node = config
        *head, last = key.split(".")
        for name in head:
            node = node[name]
        node[last] = value
    return config
