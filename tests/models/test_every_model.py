"""Every model builds on every dataset shape from its config, takes one training step (a finite
loss whose gradient reaches every trainable parameter: a layer cut off from the loss would not
learn, and no metric would say so) and is evaluated as ``capsrun train`` evaluates it after
each epoch (MultiMNIST's two digits an image included)."""

from __future__ import annotations

import math

import pytest
import torch

from capsrun import bench, registry
from capsrun.batch import unpack
from capsrun.train import evaluate
from helpers import compose_config

MODELS = ["capsnet", "baseline_cnn", "baseline_cnn_multi", "vcaps", "deep_capsnet", "rbm", "capsrbm"]
DATASETS = ["mnist", "fashion_mnist", "multimnist", "affnist", "cifar10"]


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_every_model_trains_a_step_on_every_dataset_shape(model, dataset):
    cfg = compose_config("train", f"model={model}", f"dataset={dataset}")
    torch.manual_seed(0)
    net, objective = registry.model(cfg), registry.objective(cfg)
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
    net.zero_grad(set_to_none=True)
    result = evaluate(net, objective, _OneBatch(batch), progress=False)
    assert result.metrics and all(math.isfinite(v) for v in result.metrics.values()), result.metrics
    if scores is not None:
        assert 0 <= result.metrics["test/accuracy"] <= 100 and result.scores.shape == (4, ds.num_classes)
    else:  # energy models: the pseudo-likelihood picks best.pt; the up-down pass of the image they saw
        assert torch.isfinite(torch.tensor(result.metrics["test/log_likelihood/pseudo"]))
        assert result.reconstructions.shape == x[: len(result.reconstructions)].shape
        assert 0 <= result.metrics["test/loss/reconstruction"] <= x[0].numel()


class _OneBatch:
    """A loader of one batch (a protocol's own batch format), as ``evaluate`` reads loaders."""

    def __init__(self, batch):
        self.batch = batch

    def __len__(self) -> int:
        return 1

    def epoch(self, epoch: int = 0):
        yield self.batch
