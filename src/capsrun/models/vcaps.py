"""Variational capsules: class capsules that are diagonal Gaussians, present when close to the prior.

Huang, Song, He, Sun, Tan, "Variational Capsules for Image Analysis and Synthesis",
arXiv:1807.04099 (2018). We could read only the abstract and a reader's summary, so this file keeps
apart what the paper says and what capsrun chose.

paper:
- A variational capsule k is a diagonal Gaussian q(c_k | x) = N(mu_k(x), diag(sigma_k^2(x)));
  the prior is p(z) = N(0, I).
- The presence of entity k is KL_k = KL(q(c_k | x) || p(z)) in closed form, in place of the length
  of an activity vector: present entities match the prior (small KL), absent ones do not.
- Each capsule has a margin loss on its KL; the total adds an MSE reconstruction loss and an
  adversarial loss. A generator decodes masked capsules: classification, conditional synthesis
  (sample the prior for the chosen capsule and decode), diverse samples per class.

capsrun design (ours):
- Encoder: the CapsNet trunk of arXiv:1710.09829 (conv1, :class:`PrimaryCaps`, :class:`RoutedCaps`
  with dynamic routing), reused, with class capsules of 2D dimensions. Their total input before the
  squash, s_k (Eq. 2 of 1710.09829), is split into mu_k and log sigma_k^2 (D each); routing agrees
  on squash(s_k) as in CapsNet. Why s and not the squashed v: the squash bounds |v| < 1, which
  bounds the KL below ~0.4 nats and leaves no room for an absent capsule to be far from the prior.
  log sigma^2 is clamped to [-10, 10] so exp() cannot overflow.
- Presence: KL_k (:func:`capsrun.losses.gaussian_kl`); prediction = argmin_k KL_k, exposed to the
  engine as ``scores = -KL``.
- Loss: :func:`capsrun.losses.kl_margin_loss` (present within ``m_present`` nats of the prior,
  absent at least ``m_absent`` away), plus the sum of squared pixel errors of the reconstruction
  (as CapsNet's regulariser; "MSE" up to a constant factor), plus, when ``adversarial_weight`` > 0,
  the non-saturating GAN loss of a small conv discriminator on real images vs reconstructions and
  prior samples. The discriminator belongs to the loss (:class:`VCapsLoss`), has its own optimizer
  (built from ``model.adversary_optimizer``) and learns from a term of ``total`` that reaches only
  its parameters, so the engine needs no special case.
- Decoder: CapsNet's three FC layers (:class:`capsrun.models.capsnet.Decoder`) from
  z_k = mu_k + sigma_k * eps of the true class (training; mu_k at test, of the smallest-KL class),
  every other capsule masked to zero.
- Sampling: class k, z_k ~ N(0, I), all others zero, decode (:meth:`VariationalCapsNet.generate`).

Shapes (MNIST, D = 16): x [B, 1, 28, 28] -> primary caps [B, 1152, 8] -> class capsules
s [B, 10, 32] -> mu, logvar [B, 10, 16] -> KL [B, 10] -> reconstruction [B, 1, 28, 28].
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from capsrun.layers import RoutedCaps
from capsrun.losses import gaussian_kl, kl_margin_loss, multi_hot, reconstruction_loss
from capsrun.models.capsnet import Decoder, capsule_trunk, masked_reconstruction


class VCapsOutput(NamedTuple):
    """``kl`` [B, classes] (nats); ``mu``, ``logvar`` [B, classes, dim]; ``coupling``
    [B, primary caps, classes]; ``reconstruction`` [B, C, H, W] (or [B, k, C, H, W] for k labels);
    ``prior_sample`` [B, C, H, W]: images decoded from the prior for random classes, in training
    only (what the discriminator sees besides reconstructions), else None."""

    kl: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    coupling: torch.Tensor
    reconstruction: torch.Tensor | None
    prior_sample: torch.Tensor | None

    @property
    def scores(self) -> torch.Tensor:
        """Class scores for the engine: -KL, so the most present class scores highest."""
        return -self.kl

    @property
    def digit_caps(self) -> torch.Tensor:
        """The posterior means [B, classes, dim]: what the decoder sees at test time."""
        return self.mu


class VariationalCapsNet(nn.Module):
    """CapsNet trunk + Gaussian class capsules + masked decoder; see the module docstring."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        conv1_channels: int = 256,
        conv1_kernel: int = 9,
        primary_types: int = 32,
        primary_dim: int = 8,
        primary_kernel: int = 9,
        primary_stride: int = 2,
        padding: int = 0,
        latent_dim: int = 16,
        routing_iterations: int = 3,
        routing_leaky: bool = False,
        routing_detach_inner: bool = False,
        capsule_bias: bool = True,
        weight_std: float = 0.1,
        decoder_hidden: tuple[int, ...] | list[int] = (512, 1024),
        logvar_limit: float = 10.0,
    ):
        super().__init__()
        self.num_classes, self.latent_dim, self.logvar_limit = num_classes, latent_dim, logvar_limit
        self.image_shape = (in_channels, image_size, image_size)
        self.conv1, self.primary_caps, self.num_primary_caps = capsule_trunk(
            in_channels, image_size, conv1_channels, conv1_kernel, primary_types, primary_dim, primary_kernel,
            primary_stride, padding,
        )  # fmt: skip
        self.class_caps = RoutedCaps(
            self.num_primary_caps,
            primary_dim,
            num_classes,
            2 * latent_dim,
            iterations=routing_iterations,
            bias=capsule_bias,
            leaky=routing_leaky,
            detach_inner=routing_detach_inner,
            weight_std=weight_std,
        )
        self.decoder = Decoder(num_classes, latent_dim, tuple(decoder_hidden), self.image_shape)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` [B, C, H, W] -> ``mu``, ``logvar`` [B, classes, dim] and the coupling."""
        h = F.relu(self.conv1(x), inplace=True)
        routed = self.class_caps(self.primary_caps(h))
        mu, logvar = routed.s.chunk(2, dim=-1)
        return mu, logvar.clamp(-self.logvar_limit, self.logvar_limit), routed.coupling

    def reconstruct(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Decode capsules ``z`` [B, classes, dim] masked to ``labels`` [B] (-> [B, C, H, W]) or
        [B, k] (-> [B, k, C, H, W], one reconstruction per label)."""
        return masked_reconstruction(self.decoder, z, labels, self.num_classes)

    def generate(self, classes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Class-conditional samples: for each entry of ``classes`` [N], z ~ N(0, I) in that
        class's capsule, every other capsule zero, decoded. Returns [N, C, H, W] in (0, 1)."""
        noise = torch.randn(len(classes), self.latent_dim, generator=generator, device=classes.device)
        z = noise.to(self.decoder.net[0].weight.dtype).unsqueeze(1).expand(-1, self.num_classes, -1)
        return self.decoder(z, F.one_hot(classes, self.num_classes))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> VCapsOutput:
        """Training (``labels`` given): decode a reparameterised sample of the labelled capsules.
        Test: decode the posterior mean of the smallest-KL capsule."""
        mu, logvar, coupling = self.encode(x)
        kl = gaussian_kl(mu, logvar)
        if labels is None:
            reconstruction = self.reconstruct(mu, kl.argmin(dim=-1))
        else:
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
            reconstruction = self.reconstruct(z, labels)
        prior_sample = None
        if self.training:
            prior_sample = self.generate(torch.randint(self.num_classes, (len(x),), device=x.device))
        return VCapsOutput(kl, mu, logvar, coupling, reconstruction, prior_sample)


class Discriminator(nn.Module):
    """A small conv net: image [B, C, H, W] -> real/fake logit [B]. Two strided 4x4 convs with
    LeakyReLU, global average pooling, one linear layer (capsrun design)."""

    def __init__(self, in_channels: int = 1, channels: tuple[int, ...] | list[int] = (32, 64)):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for out in channels:
            layers += [nn.Conv2d(c, out, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            c = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3))).squeeze(-1)


class VCapsLoss(nn.Module):
    """KL margin + ``reconstruction_weight`` x reconstruction [+ adversarial terms].

    Returns scalar tensors: ``kl_margin``, ``reconstruction``, ``total`` and, with an adversary,
    ``adversarial`` (the generator's non-saturating GAN loss, weighted by ``adversarial_weight``
    in ``total``) and ``discriminator`` (the discriminator's own BCE, added to ``total`` unweighted
    but computed on detached images, so it reaches only the discriminator's parameters; the
    adversarial term runs the discriminator with detached parameters, so it reaches only the
    model). One backward pass of ``total`` then trains both, each with its own optimizer.
    Also ``kl/present`` and ``kl/absent``: the mean KL of present and absent capsules (no grad).
    """

    def __init__(
        self,
        m_present: float = 0.5,
        m_absent: float = 4.0,
        down_weight: float = 0.5,
        reconstruction_weight: float = 0.0005,
        adversarial_weight: float = 0.0,
        in_channels: int = 1,
        discriminator_channels: tuple[int, ...] | list[int] = (32, 64),
    ):
        super().__init__()
        if adversarial_weight < 0:
            raise ValueError(f"adversarial_weight must be >= 0, got {adversarial_weight}")
        self.m_present, self.m_absent, self.down_weight = m_present, m_absent, down_weight
        self.reconstruction_weight, self.adversarial_weight = reconstruction_weight, adversarial_weight
        # weight 0: no discriminator at all, so no parameters and no second optimizer
        self.discriminator = Discriminator(in_channels, discriminator_channels) if adversarial_weight > 0 else None

    def forward(self, output: VCapsOutput, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        classes = output.kl.shape[-1]
        targets = F.one_hot(labels, classes) if labels.dim() == 1 else multi_hot(labels, classes)
        losses = {"kl_margin": kl_margin_loss(output.kl, targets, self.m_present, self.m_absent, self.down_weight)}
        losses["reconstruction"] = reconstruction_loss(output.reconstruction, images)
        total = losses["kl_margin"] + self.reconstruction_weight * losses["reconstruction"]
        if self.discriminator is not None and output.prior_sample is not None:
            real = images.flatten(0, 1) if images.dim() == 5 else images
            recon = output.reconstruction
            fake = torch.cat([recon.flatten(0, 1) if recon.dim() == 5 else recon, output.prior_sample])
            frozen = {k: p.detach() for k, p in self.discriminator.named_parameters()}
            fooled = functional_call(self.discriminator, frozen, (fake,))
            losses["adversarial"] = F.binary_cross_entropy_with_logits(fooled, torch.ones_like(fooled))
            d_real, d_fake = self.discriminator(real), self.discriminator(fake.detach())
            losses["discriminator"] = F.binary_cross_entropy_with_logits(
                d_real, torch.ones_like(d_real)
            ) + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
            total = total + self.adversarial_weight * losses["adversarial"] + losses["discriminator"]
        with torch.no_grad():
            t = targets.to(output.kl.dtype)
            losses["kl/present"] = (output.kl * t).sum() / t.sum()
            losses["kl/absent"] = (output.kl * (1 - t)).sum() / (1 - t).sum()
        losses["total"] = total
        return losses
