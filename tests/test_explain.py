"""Grad-CAM works for every architecture and leaves the model untouched."""

import numpy as np
import pytest
import torch

from leukray.explain import find_target_layer, gradcam, overlay, save_overlay
from leukray.model import REGISTRY, create_model

N, SIZE = 2, 64


def _images(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_gradcam_every_arch(arch):
    if REGISTRY[arch].extra:  # e.g. efficientnet_lite0: only with the [pretrained] extra
        pytest.importorskip(REGISTRY[arch].extra)
    torch.manual_seed(0)
    model = create_model(arch, num_classes=4).eval()
    assert isinstance(model.get_submodule(find_target_layer(model)), torch.nn.Conv2d)
    maps = gradcam(model, _images())
    assert maps.shape == (N, SIZE, SIZE) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert _hook_count(model) == 0
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_gradcam_targets_and_mode_restored():
    torch.manual_seed(0)
    model = create_model("leuknet", num_classes=3).train()
    images = _images(1)
    by_int = gradcam(model, images, target_class=1)
    by_seq = gradcam(model, images, target_class=[1, 1])
    np.testing.assert_allclose(by_int, by_seq, atol=1e-6)
    assert model.training  # eval only during the call
    with torch.inference_mode():  # callers inside inference mode still get gradients
        again = gradcam(model, images, target_class=1, layer="net.features.0.0")
    assert again.shape == (N, SIZE, SIZE)
    assert _hook_count(model) == 0


def test_hooks_removed_on_error():
    model = create_model("leuknet", num_classes=3).eval()
    with pytest.raises(Exception):
        gradcam(model, _images(), target_class=7)  # no such class
    assert _hook_count(model) == 0


def test_overlay_and_png(tmp_path):
    from PIL import Image

    image = _images()[0]
    heat = np.linspace(0, 1, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
    out = overlay(image, heat)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert overlay(image, heat[::2, ::2]).shape == image.shape  # other sizes are resized
    save_overlay(tmp_path / "cam.png", image, heat, title="Pro 0.93")
    with Image.open(tmp_path / "cam.png") as im:
        assert im.format == "PNG" and im.size[0] == 2 * SIZE and im.size[1] > SIZE


def test_builtin_colormap_without_matplotlib(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = overlay(np.zeros((4, 4, 3), np.uint8), np.ones((4, 4), np.float32), alpha=1.0)
    assert (out[..., 0] > 100).all() and (out[..., 2] < 50).all()  # high values are red
