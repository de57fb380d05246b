"""Shared fixtures: one embedded Ray for the whole session, small synthetic datasets."""

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from leukray.synthetic import make_dataset  # noqa: E402

REAL_DATA = os.environ.get(
    "LEUKRAY_REAL_DATA", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "all-taleqani")))


def pytest_collection_modifyitems(config, items):
    """`real_data` and `gpu` tests skip, with the reason, where their resource is missing,
    so that `make test-all` runs everywhere and does the real checks where it can."""
    skips = {}
    if not os.path.isdir(REAL_DATA):
        skips["real_data"] = pytest.mark.skip(reason=f"no real dataset at {REAL_DATA} (set LEUKRAY_REAL_DATA)")
    if any("gpu" in item.keywords for item in items):
        import torch

        if not torch.cuda.is_available():
            skips["gpu"] = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session():
    """An embedded Ray with 2 CPUs, started once (start-up costs seconds)."""
    from leukray import runtime
    from leukray.config import RayConfig

    runtime.init_ray(RayConfig(num_cpus=2))
    yield
    runtime.shutdown_ray()


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """Four classes x 30 synthetic smears (224 px JPEGs)."""
    return make_dataset(tmp_path_factory.mktemp("synth"), per_class=30, seed=1)


@pytest.fixture(scope="session")
def trained_run(ray_session, synth_data, tmp_path_factory):
    """A 2-epoch, 2-worker training run on the synthetic data (shared by several tests)."""
    from leukray.config import DataConfig, TrainConfig
    from leukray.train import fit

    out = tmp_path_factory.mktemp("run")
    result = fit(DataConfig(data=str(synth_data), image_size=64, group_size=4),
                 TrainConfig(output=str(out), epochs=2, workers=2, batch_size=32))
    return result
