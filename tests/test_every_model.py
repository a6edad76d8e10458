"""Every model builds on every dataset shape from its config and takes one training step: a
finite loss whose gradient reaches every trainable parameter (a layer cut off from the loss
would not learn, and no metric would say so)."""

from __future__ import annotations

import pytest
import torch

from capsrun import bench, build
from capsrun.batch import unpack
from conftest import compose_config

MODELS = ["capsnet", "baseline_cnn", "baseline_cnn_multi", "vcaps", "deep_capsnet", "rbm", "capsrbm"]
DATASETS = ["mnist", "fashion_mnist", "multimnist", "affnist", "cifar10"]


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_every_model_trains_a_step_on_every_dataset_shape(model, dataset):
    cfg = compose_config("train", f"model={model}", f"dataset={dataset}")
    torch.manual_seed(0)
    net, objective = build.model(cfg), build.objective(cfg)
    ds = cfg.dataset
    batch = bench.synthetic_batch(
        4, ds.channels, ds.image_size, ds.num_classes, 2 if dataset == "multimnist" else 1, "cpu"
    )
    x, y, target = unpack(batch)
    out = net(x, y)
    scores = getattr(out, "scores", None)
    if scores is not None:  # classifiers: a score per class
        assert scores.shape == (4, ds.num_classes)
    losses = objective(out, target, y)
    assert torch.isfinite(losses["total"])
    losses["total"].backward()
    cut_off = [n for n, p in net.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not cut_off, f"no gradient reaches {cut_off}"
