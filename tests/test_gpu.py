"""What `--gpu` relies on, checked on CUDA (skipped without it, see conftest): a model file
loads onto the GPU and predicts what it predicts on CPU (scoring actors), and the training
step with augmentation runs and learns there (Ray Train workers with `use_gpu`)."""

import numpy as np
import pytest
import torch

from leukray.config import TrainConfig
from leukray.model import create_model, load_model, save_model
from leukray.recipe import make_optimizer, train_step

pytestmark = pytest.mark.gpu

CLASSES = ["Benign", "Early", "Pre", "Pro"]
SIZE = 64
MEAN, STD = [0.8, 0.67, 0.7], [0.12, 0.17, 0.1]


def _images(n, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8))


def test_model_file_predicts_the_same_on_cuda(tmp_path):
    torch.manual_seed(0)
    model = create_model("leuknet", len(CLASSES), MEAN, STD).eval()
    save_model(tmp_path / "model.pt", model, {"arch": "leuknet", "classes": CLASSES, "image_size": SIZE,
                                              "mean": MEAN, "std": STD})
    on_gpu, _ = load_model(tmp_path / "model.pt", "cuda")
    assert next(on_gpu.parameters()).is_cuda
    x = _images(8)
    with torch.inference_mode():
        cpu = torch.softmax(model(x), 1)
        gpu = torch.softmax(on_gpu(x.cuda()), 1).cpu()
    assert torch.allclose(cpu, gpu, atol=2e-3)  # TF32 convolutions on recent GPUs


def test_training_step_with_augmentation_learns_on_cuda():
    torch.manual_seed(0)
    cfg = TrainConfig(output="unused", augment=True)
    model = create_model("leuknet", len(CLASSES), MEAN, STD).cuda().train()
    optimizer = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(0)  # the workers' CPU generator, as in train.py
    y = torch.arange(16) % len(CLASSES)
    x = (_images(16) // 4 + (40 + 50 * y).to(torch.uint8).view(-1, 1, 1, 1))  # the class is in the brightness
    x, y = x.cuda(), y.cuda()
    losses = [float(train_step(model, optimizer, x, y, cfg, 3e-3, gen, None)[0]) for _ in range(20)]
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
