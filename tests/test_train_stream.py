"""The streaming data path of training (`train._batches` with no in-worker cache).

Workers cache their shard in memory unless it is larger than `train.WORKER_CACHE_BYTES`
(2 GiB), so the synthetic data of the other tests always takes the cached path; these tests
force the streaming one, which real archives larger than the limit take.
"""

import numpy as np
import pytest
import torch

from leukray.train import _batches

N_ROWS = 101  # odd, and not a multiple of the batch size: the last batch is a short one
BATCH = 16


@pytest.fixture(scope="module")
def numbered_rows(ray_session):
    """A materialized Ray Dataset of N_ROWS (image, label) rows, several blocks, like
    `train.labeled_dataset`'s; row i has label i and an image filled with i % 256."""
    import ray

    items = [{"image": np.full((4, 4, 3), i % 256, np.uint8), "label": i} for i in range(N_ROWS)]
    return ray.data.from_items(items, override_num_blocks=7).materialize()


def _epoch(shard, cache, seed):
    batches = list(_batches(shard, BATCH, torch.device("cpu"), cache, shuffle_seed=seed))
    assert all(len(b["label"]) <= BATCH for b in batches)
    labels = torch.cat([b["label"] for b in batches])
    images = torch.cat([b["image"] for b in batches])
    # every image still travels with its own label
    assert torch.equal(images[:, 0, 0, 0].long(), labels % 256)
    return labels.tolist()


@pytest.mark.parametrize("seed", [7, None], ids=["train-shuffled", "eval-in-order"])
def test_streaming_epoch_yields_every_row_once(numbered_rows, seed):
    """A Train worker's shard is a Ray Data iterator: stream it as `cache_in_worker=False` does."""
    labels = _epoch(numbered_rows.iterator(), None, seed)
    assert sorted(labels) == list(range(N_ROWS)), "each training row exactly once per epoch"


def test_streaming_and_cached_epochs_see_the_same_rows(numbered_rows):
    cache: dict = {}
    cached = [_epoch(numbered_rows.iterator(), cache, seed) for seed in (1, 2)]
    streamed = _epoch(numbered_rows.iterator(), None, 1)
    assert sorted(streamed) == sorted(cached[0]) == sorted(cached[1]) == list(range(N_ROWS))
    assert cached[0] != cached[1], "each epoch is a new permutation"


@pytest.mark.slow
def test_fit_streams_when_the_shard_exceeds_the_worker_cache(synth_data, ray_session, tmp_path, monkeypatch):
    """A whole (1-epoch) fit on the streaming path: train and val shards streamed in the workers."""
    import json

    import ray.train.torch

    from leukray import train
    from leukray.config import DataConfig, TrainConfig

    monkeypatch.setattr(train, "WORKER_CACHE_BYTES", 0)
    cache_flags = []
    real_trainer = ray.train.torch.TorchTrainer

    def spy(*args, **kwargs):
        cache_flags.append(kwargs["train_loop_config"]["cache_in_worker"])
        return real_trainer(*args, **kwargs)

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", spy)
    result = train.fit(DataConfig(data=str(synth_data), image_size=32, group_size=4),
                       TrainConfig(output=str(tmp_path / "run"), epochs=1, workers=2, batch_size=32))
    assert cache_flags == [False], "the workers were told to stream"
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1]
    assert np.isfinite(history[0]["train_loss"]) and 0 <= history[0]["val_accuracy"] <= 1
    assert history[0]["train_images_per_s"] > 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["n"] > 0
