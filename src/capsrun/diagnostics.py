"""Capsule health: dead capsules, routing statistics, gradient flow and affine sensitivity.

The questions come from Mitterreiter, Koch, Giesen, Laue, "Why Capsule Neural Networks Do Not
Scale: Challenging the Dynamic Parse-Tree Assumption", AAAI 2023, arXiv:2301.01583: routing is
nearly static (couplings hardly depend on the input), no parse tree emerges, activations are not
invariant to affine transforms, and vanishing gradients starve the capsules of deep stacks. That
paper's exact metric definitions were not available to us: every definition below is capsrun's
own, written out where it is computed (README, "Models in brief").

Pure functions of tensors plus :class:`CapsuleProbe`, which records the capsules and couplings of
every :class:`~capsrun.layers.PrimaryCaps` and :class:`~capsrun.layers.RoutedCaps` of a model with
forward hooks, so no model needs to know about diagnostics. Nothing here reads a config or logs.

Tags: ``<layer>/dead_share``, ``<layer>/constant_share``, ``<layer>/length/{mean,q10,q50,q90}``,
``<layer>/coupling/{max,entropy}``, ``<layer>/routing/{std,deviation}``, ``<layer>/grad_norm``,
``<layer>/affine_change`` and ``affine/agreement``; the engine prefixes ``health/``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from capsrun.layers import PrimaryCaps, RoutedCaps, safe_norm

# --- metrics of one layer: pure functions -------------------------------------------------------


def dead_share(lengths: torch.Tensor, threshold: float = 0.01) -> float:
    """Share of capsules whose length stays below ``threshold`` for EVERY example (ours).

    ``lengths``: ``[examples, caps]``. A capsule that is active for a single example is alive.
    """
    return (lengths.amax(dim=0) < threshold).float().mean().item()


def constant_share(lengths: torch.Tensor, threshold: float = 0.01) -> float:
    """Share of capsules whose length varies across examples by a standard deviation below
    ``threshold`` (ours): alive by length, yet carrying no information about the input, which
    is how starved intermediate capsules of deep stacks look: uniform couplings and the same
    length for every input (README, "Results"). ``lengths``: ``[examples, caps]``, two or more."""
    return (lengths.float().std(dim=0, unbiased=False) < threshold).float().mean().item()


def length_stats(lengths: torch.Tensor) -> dict[str, float]:
    """Mean and 10/50/90 % quantiles of all capsule lengths ``[examples, caps]``."""
    flat = lengths.flatten().float()
    if flat.numel() > 1_000_000:  # torch.quantile's input limit is 16M; a strided subsample suffices
        flat = flat[:: flat.numel() // 1_000_000 + 1]
    q = torch.quantile(flat, torch.tensor([0.1, 0.5, 0.9], dtype=flat.dtype, device=flat.device)).tolist()
    return {"length/mean": flat.mean().item(), "length/q10": q[0], "length/q50": q[1], "length/q90": q[2]}


def _normalised(coupling: torch.Tensor) -> torch.Tensor:
    # leaky routing leaves each child's couplings summing to < 1: compare distributions
    return coupling / coupling.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def coupling_sharpness(coupling: torch.Tensor) -> dict[str, float]:
    """How tree-like the routing is (ours): per child i, the largest coupling max_j c_ij and the
    entropy of c_i. over the J parents divided by log J, averaged over examples and children.

    ``coupling``: ``[examples, in_caps, out_caps]``. Uniform couplings (no parse tree) give
    ``max`` = 1/J and ``entropy`` = 1; one-hot couplings (a strict tree) give 1 and 0.
    """
    c = _normalised(coupling.float())
    parents = c.shape[-1]
    entropy = -(c * c.clamp_min(1e-12).log()).sum(-1)
    norm = math.log(parents) if parents > 1 else 1.0
    return {"coupling/max": c.amax(-1).mean().item(), "coupling/entropy": (entropy.mean() / norm).item()}


def routing_dynamics(coupling: torch.Tensor) -> dict[str, float]:
    """How much the couplings depend on the input (ours): ``std``, the mean over (i, j) of the
    standard deviation of c_ij across examples, and ``deviation``, the mean over examples and
    (i, j) of |c_ij(x) - mean_x c_ij|. Both are 0 for static routing.

    ``coupling``: ``[examples, in_caps, out_caps]`` with at least two examples.
    """
    c = _normalised(coupling.float())
    mean = c.mean(dim=0, keepdim=True)
    return {
        "routing/std": c.std(dim=0, unbiased=False).mean().item(),
        "routing/deviation": (c - mean).abs().mean().item(),
    }


def mean_coupling_image(coupling: torch.Tensor, row_height: int = 4) -> torch.Tensor:
    """The mean coupling matrix over examples as a grey image ``[1, out_caps * row_height,
    in_caps]`` scaled to [0, 1] by its maximum: row j is parent j, column i child i."""
    m = _normalised(coupling.float()).mean(0).t()  # [out, in]
    m = m / m.max().clamp_min(1e-12)
    return m.repeat_interleave(row_height, dim=0).unsqueeze(0).cpu()


def gradient_norm(module: nn.Module) -> float | None:
    """L2 norm of the gradients of a module's parameters (None when none has a gradient)."""
    grads = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    return torch.stack(grads).norm().item()


def affine(x: torch.Tensor, rotation: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Images ``[B, C, H, W]`` rotated by ``rotation`` degrees ``[B]`` (counter-clockwise on
    screen), scaled by ``scale`` ``[B]`` about the centre and moved by ``shift`` pixels ``[B, 2]``
    as (dx, dy), dx right, dy down; bilinear, zero fill. Square images (a rotation in
    affine_grid's normalised coordinates is one in pixels only when H = W)."""
    _, _, h, w = x.shape
    angle = torch.deg2rad(rotation.float())
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # affine_grid maps OUTPUT coordinates in [-1, 1] to input coordinates: the inverse transform
    tx, ty = -shift[:, 0].float() * 2 / w, -shift[:, 1].float() * 2 / h
    # rotation on screen (y down) is A = [[c, s], [-s, c]]; the grid needs A^-1 and -A^-1 t
    rx = cos * tx - sin * ty
    ry = sin * tx + cos * ty
    theta = torch.stack([torch.stack([cos, -sin, rx], 1), torch.stack([sin, cos, ry], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_affine(x: torch.Tensor, rotation: float, scale: float, shift: float, gen: torch.Generator) -> torch.Tensor:
    """Each image ``[B, C, H, W]`` under its own small :func:`affine` transform: a rotation uniform
    in +-``rotation`` degrees, a scale factor uniform in 1 +- ``scale``, a translation uniform in
    +-``shift`` pixels per axis. Parameters come from ``gen`` (CPU), not the global RNG."""
    u = (torch.rand(x.shape[0], 4, generator=gen) * 2 - 1).to(x.device)
    return affine(x, u[:, 0] * rotation, 1 + u[:, 1] * scale, u[:, 2:] * shift)


def affine_change(before: torch.Tensor, after: torch.Tensor) -> float:
    """Relative change of a layer's capsules under a transform of the input (ours): the mean
    over examples of ||u(Tx) - u(x)|| / ||u(x)||, norms over all capsules and dimensions.
    ``before``, ``after``: ``[examples, caps, dim]``. 0 means invariant."""
    diff = (after - before).flatten(1).norm(dim=1)
    return (diff / before.flatten(1).norm(dim=1).clamp_min(1e-12)).mean().item()


# --- recording a model's capsules ---------------------------------------------------------------


@dataclass
class LayerRecord:
    """What one capsule layer produced for a batch: capsules ``[B, caps, dim]`` and, for a
    routed layer, its couplings ``[B, in_caps, out_caps]``."""

    capsules: list[torch.Tensor] = field(default_factory=list)
    coupling: list[torch.Tensor] = field(default_factory=list)


def capsule_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(tag, module)`` of every primary and routed capsule layer, in forward order
    (``primary_caps``, ``hidden_caps_0``, ..., ``digit_caps``), and of every module that says it
    is one (``capsule_layer = True``: the capsule RBM's routing)."""
    return [
        (name.replace(".", "_"), m)
        for name, m in model.named_modules()
        if isinstance(m, (PrimaryCaps, RoutedCaps)) or getattr(m, "capsule_layer", False)
    ]


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers whose gradient norms are reported: the capsule layers and every other direct
    child with parameters of its own (``conv1``, ``decoder``)."""
    caps = capsule_layers(model)
    inside = {id(p) for _, m in caps for p in m.parameters()}
    others = [
        (name, m)
        for name, m in model.named_children()
        if any(True for _ in m.parameters()) and not any(id(p) in inside for p in m.parameters())
    ]
    return others[:1] + caps + others[1:]  # conv1 first, the decoder last


class CapsuleProbe:
    """Forward hooks that record every capsule layer's output while active::

    probe = CapsuleProbe(model)
    with probe.recording():
        model(x)
    probe.records["digit_caps"].coupling  # list of [B, in_caps, out_caps]
    """

    def __init__(self, model: nn.Module):
        self.layers = capsule_layers(model)
        self.records: dict[str, LayerRecord] = {}

    @contextmanager
    def recording(self) -> Iterator[dict[str, LayerRecord]]:
        self.records = {tag: LayerRecord() for tag, _ in self.layers}
        handles = [m.register_forward_hook(self._hook(tag)) for tag, m in self.layers]
        try:
            yield self.records
        finally:
            for h in handles:
                h.remove()

    def _hook(self, tag: str):
        def hook(module, inputs, output):
            rec = self.records[tag]
            if isinstance(output, tuple) and hasattr(output, "coupling"):
                rec.capsules.append(output.v.detach())
                rec.coupling.append(output.coupling.detach())
            else:
                rec.capsules.append(output.detach())

        return hook


# --- all metrics of a model on a batch ----------------------------------------------------------


PARSE_IMAGES = 16  # images in a parse picture


@dataclass
class AffineSpec:
    """Small affine transforms for the invariance metric: degrees, scale fraction, pixels."""

    rotation: float = 5.0
    scale: float = 0.05
    shift: float = 1.0


@dataclass
class Health:
    """Scalars (``{tag: value}``), histograms (``{tag: values}``) and images (``{tag: [1, H, W]}``)."""

    scalars: dict[str, float]
    histograms: dict[str, torch.Tensor] = field(default_factory=dict)
    images: dict[str, torch.Tensor] = field(default_factory=dict)


def _forward_records(model: nn.Module, probe: CapsuleProbe, x: torch.Tensor, batch_size: int):
    outs = []
    with probe.recording() as rec:
        for chunk in x.split(batch_size):
            scores = model(chunk).scores  # None for a model without classes
            outs.append(torch.zeros(len(chunk), 1, device=x.device) if scores is None else scores.float())
    caps = {t: torch.cat(r.capsules) for t, r in rec.items() if r.capsules}
    couplings = {t: torch.cat(r.coupling) for t, r in rec.items() if r.coupling}
    return torch.cat(outs), caps, couplings


@torch.no_grad()
def measure(
    model: nn.Module,
    x: torch.Tensor,
    *,
    threshold: float = 0.01,
    full: bool = True,
    affine: AffineSpec | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> Health:
    """Health of every capsule layer of ``model`` on the inputs ``x`` ``[N, C, H, W]``.

    Always: dead share, length statistics, coupling max and entropy. With ``full``: routing
    dynamics, the affine change per layer and the prediction agreement under the transforms
    (``affine``, drawn from ``seed``), histograms and mean coupling images. The model is put in
    eval mode and left in the mode it was in; the global RNG is not touched.
    """
    was_training = model.training
    model.eval()
    try:
        probe = CapsuleProbe(model)
        scores, caps, couplings = _forward_records(model, probe, x, batch_size)
        scalars: dict[str, float] = {}
        health = Health(scalars)
        for tag, u in caps.items():
            lengths = safe_norm(u.float(), dim=-1)
            scalars[f"{tag}/dead_share"] = dead_share(lengths, threshold)
            scalars[f"{tag}/constant_share"] = constant_share(lengths, threshold)
            scalars.update({f"{tag}/{k}": v for k, v in length_stats(lengths).items()})
            if full:
                health.histograms[f"{tag}/length"] = lengths.flatten().cpu()
        for tag, c in couplings.items():
            scalars.update({f"{tag}/{k}": v for k, v in coupling_sharpness(c).items()})
            if full:
                scalars.update({f"{tag}/{k}": v for k, v in routing_dynamics(c).items()})
                health.histograms[f"{tag}/coupling"] = c.flatten().cpu()
                health.images[f"{tag}/mean_coupling"] = mean_coupling_image(c)
                layer = dict(probe.layers)[tag]
                if hasattr(layer, "parse_image"):  # which parent each part routes to, on the first images
                    health.images[f"{tag}/parse"] = layer.parse_image(x[:PARSE_IMAGES], c[:PARSE_IMAGES])
        if full:
            spec = affine or AffineSpec()
            gen = torch.Generator().manual_seed(seed)
            moved = random_affine(x.float(), spec.rotation, spec.scale, spec.shift, gen).to(x.dtype)
            scores_t, caps_t, _ = _forward_records(model, probe, moved, batch_size)
            for tag, u in caps.items():
                scalars[f"{tag}/affine_change"] = affine_change(u.float(), caps_t[tag].float())
            scalars["affine/agreement"] = 100.0 * (scores.argmax(-1) == scores_t.argmax(-1)).float().mean().item()
        return health
    finally:
        model.train(was_training)


def gradient_norms(model: nn.Module) -> dict[str, float]:
    """``{<layer>/grad_norm: value}`` from the gradients the last backward pass left."""
    out = {}
    for tag, module in weight_layers(model):
        norm = gradient_norm(module)
        if norm is not None:
            out[f"{tag}/grad_norm"] = norm
    return out


class HealthMonitor:
    """A step hook for :func:`capsrun.train.fit`: every ``every_steps`` optimizer steps, the
    gradient norms of the step just taken and :func:`measure` on a fixed evaluation batch.

    The cost is bounded by ``len(x)`` and ``every_steps``; the training result is unchanged
    (eval mode, no gradient, a private RNG for the transforms).
    """

    def __init__(
        self,
        x: torch.Tensor,
        every_steps: int,
        *,
        full: bool,
        threshold: float = 0.01,
        affine: AffineSpec | None = None,
        seed: int = 0,
    ):
        self.x, self.every_steps, self.full = x, every_steps, full
        self.threshold, self.affine, self.seed = threshold, affine, seed

    def __call__(self, model: nn.Module, step: int) -> Health:
        grads = gradient_norms(model)
        health = measure(
            model,
            self.x,
            threshold=self.threshold,
            full=self.full,
            affine=self.affine,
            seed=self.seed,
            batch_size=len(self.x),
        )
        health.scalars.update(grads)
        return health


TABLE_COLUMNS = (
    ("dead", "dead_share", "{:.1%}"),
    ("const", "constant_share", "{:.1%}"),
    ("len mean", "length/mean", "{:.3f}"),
    ("len q90", "length/q90", "{:.3f}"),
    ("c max", "coupling/max", "{:.3f}"),
    ("c entropy", "coupling/entropy", "{:.3f}"),
    ("routing std", "routing/std", "{:.2e}"),
    ("grad norm", "grad_norm", "{:.2e}"),
    ("affine", "affine_change", "{:.3f}"),
)


def health_table(runs: dict[str, dict[str, float]]) -> str:
    """A plain-text table, one row per (run, layer) in forward order, from ``{run: scalars}``."""
    header = ["run", "layer", *(c[0] for c in TABLE_COLUMNS)]
    rows = []
    for run, scalars in runs.items():
        layers = list(dict.fromkeys(k.split("/", 1)[0] for k in scalars if k.split("/", 1)[0] != "affine"))
        for layer in layers:
            cells = [run, layer]
            for _, key, fmt in TABLE_COLUMNS:
                value = scalars.get(f"{layer}/{key}")
                cells.append("-" if value is None else fmt.format(value))
            rows.append(cells)
            run = ""  # the run's name once, on its first layer
        if "affine/agreement" in scalars:
            rows.append(
                ["", "(predictions unchanged by the affine transforms: {:.1f}%)".format(scalars["affine/agreement"])]
            )
    widths = [
        max(len(r[i]) for r in [header, *rows] if len(r) > i and len(r) == len(header)) for i in range(len(header))
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) if len(r) == len(header) else "  ".join(r))
    return "\n".join(lines)
