"""The weight average (recipe.WeightEma): closed form, buffers, the loop's use and resume."""


import pytest
import torch
from torch import nn

import ray.train

from leukray import train
from leukray.recipe import WeightEma
from test_train_loop import _config, fake_ray_train, replay_checkpoint  # noqa: F401 (fixture)
from test_collectives import recorded  # noqa: F401 (fixture)


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_ema_after_n_steps_is_the_closed_form_average():
    """ema_N = w_0 * prod(d_t) + sum_t (1 - d_t) * w_t * prod_{j > t} d_j, with
    d_t = min(decay, (1 + t) / (10 + t)); BatchNorm running stats averaged, the counter copied."""
    model = _tiny()
    ema = WeightEma(model, decay=0.3)
    snapshots = [{k: v.clone() for k, v in model.state_dict().items()}]  # w_0: the copy EMA starts from
    for t in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_mean.add_(float(t + 1))
            model[1].num_batches_tracked.add_(1)
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        ema.update(model)
    decays = [min(0.3, (1 + t) / (10 + t)) for t in range(6)]
    assert decays[:2] == [0.1, 2 / 11] and decays[-1] == 0.3  # warm-up, then the cap
    for name in ("0.weight", "0.bias", "1.weight", "1.running_mean", "1.running_var"):
        expected = snapshots[0][name].double()
        for t, d in enumerate(decays):
            expected = d * expected + (1 - d) * snapshots[t + 1][name].double()
        torch.testing.assert_close(ema.module.state_dict()[name].double(), expected, rtol=1e-5, atol=1e-6)
    assert int(ema.module.state_dict()["1.num_batches_tracked"]) == 6  # copied, not averaged
    assert ema.updates == 6


def test_ema_holds_its_own_weights_and_refuses_a_bad_decay():
    model = _tiny()
    ema = WeightEma(model, 0.9)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(ema.module[0].weight, model[0].weight)  # a copy, not the same tensors
    assert not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError, match="ema-decay"):
        WeightEma(model, 1.0)


def test_loop_validates_and_saves_the_average(fake_ray_train, recorded):
    """With --ema the loop updates the average every step and keeps *its* weights as the
    best model; with --no-ema the checkpoint has no average and keeps the raw weights."""
    train.train_loop_per_worker(_config(True, epochs=2))
    _, ckpt = fake_ray_train[-1]
    assert ckpt["ema"]["updates"] == 6  # 3 steps an epoch
    if ckpt["best"]["epoch"] == 1:
        for k, v in ckpt["best_model"].items():
            assert torch.equal(v, ckpt["ema"]["module"][k]), k
    assert any(not torch.equal(ckpt["model"][k], ckpt["ema"]["module"][k]) for k in ckpt["model"])

    fake_ray_train.clear()
    config = _config(True, epochs=1)
    config["train"]["ema"] = False
    train.train_loop_per_worker(config)
    _, ckpt = fake_ray_train[-1]
    assert ckpt["ema"] is None
    for k, v in ckpt["best_model"].items():
        assert torch.equal(v, ckpt["model"][k]), k


def test_resume_restores_the_average(fake_ray_train, recorded, monkeypatch):
    """A resumed run continues the checkpoint's average (same tensors, same update count)
    instead of starting a new one from the latest raw weights."""
    train.train_loop_per_worker(_config(True, epochs=1))
    _, blob = fake_ray_train.pop()
    replay_checkpoint(blob, monkeypatch)

    made = []
    real = train._make_ema

    def spy(*a, **k):
        ema = real(*a, **k)
        made.append(ema.state_dict())
        return ema

    monkeypatch.setattr(train, "_make_ema", spy)
    train.train_loop_per_worker(_config(True, epochs=2))
    restored = made[0]
    assert restored["updates"] == blob["ema"]["updates"] == 3
    for k, v in blob["ema"]["module"].items():
        assert torch.equal(restored["module"][k], v), k
    assert not all(torch.equal(blob["ema"]["module"][k], blob["model"][k]) for k in blob["model"])
    assert fake_ray_train[-1][1]["ema"]["updates"] == 6
