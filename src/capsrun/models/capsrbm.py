"""A capsule RBM: a product of expert capsules, mixed by dynamic routing, trained without labels.

Paper (Hauser, "Training products of expert capsules with mixing by dynamic routing",
arXiv:1907.11643, 2019; companion arXiv:1907.11639, trained by contrastive divergence): by
analogy with an RBM's binary hidden units, a capsule's length is the probability that it is on;
"inference on the capsule network is computed with the dynamic routing between capsules
procedure". The sources give no energy; the one below is capsrun's (docs/capsrbm.md): routing is
a latent part-whole assignment, and dynamic routing is mean-field inference of it.

Visible layer: binary pixels v, cut into non-overlapping ``patch x patch`` visible capsules v_i
(i = 1..P). Hidden layer: N capsules; capsule j has an on/off switch z_j and D binary pose units
h_j, off when the switch is off (as the capsule RBM of Li & Zhu, 2019). The capsules form G groups
of K = N / G. Routing: r_i says which capsule of each group explains patch i (the parse): r_ij in
{0, 1}, one parent per patch and group (G = 1: one parent in all; G = N: every capsule, no choice,
the gated RBM p(v) ~ e^{a.v} prod_j [1 + e^{b_j} prod_d (1 + e^{s_jd})]). Votes u_{j|i} = W_ij v_i
[D]; prior logits pi_ij (a patch's preference for a parent, learned).

    E(v, r, z, h) = -a . v - sum_j z_j (b_j + beta_j . h_j) - sum_ij r_ij (z_j h_j . u_{j|i} + pi_ij)

Every block conditional factorises, so block Gibbs is exact (acceptance 1):

    p(r_i = j | v, z, h) = softmax_j(z_j h_j . u_{j|i} + pi_ij)     routing by agreement, j in each group
    s_j = beta_j + sum_i r_ij u_{j|i}                                  the routed capsule [D]
    p(z_j = 1 | v, r) = sigmoid(b_j + sum_d softplus(s_jd))            the capsule fires
    p(h_jd = 1 | v, r, z_j = 1) = sigmoid(s_jd)                        its pose
    p(v_i = 1 | r, z, h) = sigmoid(a_i + sum_j r_ij W_ij^T z_j h_j)    each patch drawn by its parents

Summed over (z, h) given r the capsules are independent, so the joint free energy is closed form:

    F(v, r) = -a . v - sum_i pi_{i r_i} - sum_j softplus(b_j + sum_d softplus(s_jd(v, r)))

F(v) = -log sum_r e^{-F(v, r)} sums K^(P G) assignments: no closed form. Inference is mean field over
soft couplings c_i (a distribution over parents per patch and group): -F(v, c) + H(c) <= log sum_r e^{-F(v, r)}
(Jensen, twice: log-sum-exp over r, and -F(v, r) is convex in r), maximised by the fixed point

    c_ij <- softmax_j(pi_ij + u_{j|i} . mu_j) within each group,    mu_j = p(z_j = 1) sigmoid(s_j),
    s_j = beta_j + sum_i c_ij u_{j|i}

which is Procedure 1 of arXiv:1710.09829 with the capsule's mean mu_j in place of squash(s_j): so
``routing_iterations`` is the number of mean-field passes (1: the couplings stay at the prior
softmax(pi), the same for every image). Training follows deep Boltzmann machines (Salakhutdinov &
Hinton, AISTATS 2009): the positive phase is the gradient of the mean-field bound F(v, c) - H(c)
with c held fixed, the negative phase F(v, r) of persistent block-Gibbs chains over (v, r)
(:class:`~capsrun.models.energy.EnergyModel`; the routes are part of the chains' state).

Likelihood: log Z by AIS on the joint (v, r) from the base-rate model (beta = 0: pixels from the
base rate, r uniform, capsules uniform: log Z_0 exact); log p(v) by importance sampling over r with
the mean-field couplings as the proposal: mean_k e^{-F(v, r_k)} / q(r_k) is unbiased for the
unnormalised p(v), its log a lower bound in expectation that tightens with K
(:meth:`CapsuleRBM.marginal_free_energy`). What is the paper's: capsules whose firing
probability comes from routing, products of experts, CD-style training without labels. What is
ours: the energy, the latent routes, the groups, mean field as the routing procedure, the learned
prior pi.

Shapes (MNIST, patch 4): x [B, 1, 28, 28] -> visible capsules [B, 49, 16] -> votes [B, 49, N, D]
-> couplings c [B, 49, N] (each group's K sum to 1), s [B, N, D] -> p(z | v) [B, N]; F [B]; a
chain's routes [B, 49 G], entry i G + g patch i's parent within group g.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from capsrun.mcmc.base import Beta
from capsrun.models.energy import EnergyModel, bernoulli, per_row, softplus


class Routed(NamedTuple):
    """What the energy and the chain need of v: ``s`` [B, N, D] the routed capsules; for inference
    the mean-field ``coupling`` [B, P, N] and the ``votes`` [B, P, N, D] (``routes`` None); for a
    chain's state ``routes`` [B, P * G], each patch's parents (``coupling``, ``votes`` None). After
    the last step of a chain only ``routes`` is filled."""

    s: torch.Tensor | None
    coupling: torch.Tensor | None
    votes: torch.Tensor | None
    routes: torch.Tensor | None

    @property
    def latent(self) -> torch.Tensor | None:
        return self.routes


class MeanField(NamedTuple):
    """The routing layer's output: ``v`` [B, N, D] the capsules' means E[z_j h_j] (what the
    capsule-health probe reads), ``coupling`` [B, P * G, K] (a child is a patch's choice within
    one group: a distribution over that group's K capsules), ``s`` [B, N, D]."""

    v: torch.Tensor
    coupling: torch.Tensor
    s: torch.Tensor


def capsule_mean(s: torch.Tensor, switch_bias: torch.Tensor) -> torch.Tensor:
    """mu_j = p(z_j = 1 | s) sigmoid(s_j) ``[B, N, D]`` from the routed capsules ``s`` [B, N, D]."""
    on = torch.sigmoid(switch_bias + F.softplus(s).sum(-1))
    return on.unsqueeze(-1) * torch.sigmoid(s)


def mean_field_couplings(
    votes: torch.Tensor,
    prior: torch.Tensor,
    switch_bias: torch.Tensor,
    pose_bias: torch.Tensor,
    iterations: int,
    groups: int = 1,
) -> torch.Tensor:
    """Couplings ``[B, P, N]`` after ``iterations`` mean-field passes (see the module docstring):
    start at softmax(pi); each pass but the last routes the votes ``votes`` [B, P, N, D], takes the
    capsules' means and re-weighs every patch's parents by agreement with them. The N capsules are
    ``groups`` groups of K = N / groups; a patch has one parent in each group, so each group's K
    couplings sum to 1. ``prior`` [P, N], ``switch_bias`` [N], ``pose_bias`` [N, D]."""
    if iterations < 1:
        raise ValueError(f"routing iterations must be >= 1, got {iterations}")
    b, p, n, _ = votes.shape
    logits = prior.view(p, groups, n // groups)
    coupling = torch.softmax(logits, -1).expand(b, -1, -1, -1)
    for _ in range(iterations - 1):
        s = torch.einsum("bij,bijd->bjd", coupling.reshape(b, p, n), votes) + pose_bias
        agreement = torch.einsum("bijd,bjd->bij", votes, capsule_mean(s, switch_bias))
        coupling = torch.softmax(logits + agreement.view(b, p, groups, -1), -1)
    return coupling.reshape(b, p, n)


class PartWholeRouting(nn.Module):
    """Routing by agreement as mean-field inference of the parse (no parameters of its own: the
    capsule RBM passes them). A module so that the capsule-health probe records its couplings
    (``capsule_layer``) and draws the parse (:meth:`parse_image`)."""

    capsule_layer = True

    def __init__(self, iterations: int, grid: int, patch: int, groups: int = 1):
        super().__init__()
        self.iterations, self.grid, self.patch, self.groups = iterations, grid, patch, groups

    def forward(self, votes, prior, switch_bias, pose_bias) -> MeanField:
        b, p, n, _ = votes.shape
        with torch.no_grad():  # c is held fixed in the gradient (the bound's envelope)
            coupling = mean_field_couplings(votes, prior, switch_bias, pose_bias, self.iterations, self.groups)
        s = torch.einsum("bij,bijd->bjd", coupling, votes) + pose_bias
        return MeanField(capsule_mean(s, switch_bias), coupling.view(b, p * self.groups, -1), s)

    def parse_image(self, x: torch.Tensor, coupling: torch.Tensor) -> torch.Tensor:
        """Which capsule each patch routes to, for images ``x`` [B, C, H, W] and their couplings
        [B, P * G, K] (:class:`MeanField`): every patch tinted by a colour per capsule (its argmax
        parent in the group), brightness the pixel's ink and the coupling's weight; the images
        side by side, one row per group, 3x enlarged ``[3, 3 (G (H + 1) - 1), 3 B (W + 1)]``."""
        per_group = coupling.view(len(x), self.grid * self.grid, self.groups, -1)  # [B, P, G, K]
        ink = x.float().mean(1, keepdim=True).clamp(0, 1)
        rows = []
        for g in range(self.groups):
            parent = per_group[:, :, g].argmax(-1)  # [B, P]
            weight = per_group[:, :, g].amax(-1)
            hue = parent.float() * 0.618034 % 1.0  # golden-ratio hues: neighbouring indices look different
            colour = torch.stack([(hue + k / 3) % 1.0 for k in range(3)], -1)
            colour = 0.5 + 0.5 * torch.cos(2 * math.pi * colour)  # [B, P, 3]
            tint = (colour * (0.35 + 0.65 * weight.unsqueeze(-1))).permute(0, 2, 1)
            tint = tint.reshape(len(x), 3, self.grid, self.grid)
            tint = tint.repeat_interleave(self.patch, 2).repeat_interleave(self.patch, 3)
            shown = F.pad(tint * (0.15 + 0.85 * ink), (0, 1), value=1.0)
            rows.append(shown.permute(1, 2, 0, 3).reshape(3, shown.shape[2], -1))
            if g < self.groups - 1:  # a white line between the groups' rows
                rows.append(torch.ones(3, 1, rows[-1].shape[-1], dtype=rows[-1].dtype, device=rows[-1].device))
        picture = torch.cat(rows, 1)
        return picture.repeat_interleave(3, 1).repeat_interleave(3, 2).cpu()


class CapsuleRBM(EnergyModel):
    """See the module docstring for the energy, the conditionals, inference and the gradient."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int | None = None,  # unused: the model never sees labels
        patch: int = 4,
        hidden_caps: int = 50,
        hidden_dim: int = 10,
        groups: int = 1,
        routing_iterations: int = 3,
        weight_std: float = 0.01,
        likelihood_samples: int = 100,
        **training,
    ):
        """``groups``: the capsules form this many groups, and each patch has one parent in every
        group (1: one parent in all); ``routing_iterations``: mean-field passes of inference;
        ``likelihood_samples``: K of the importance-sampled log p(v).
        ``training``: how it is trained (:class:`~capsrun.models.energy.EnergyModel`:
        ``cd_steps``, ``chains``, ``tempering``, ...)."""
        super().__init__((in_channels, image_size, image_size), **training)
        if image_size % patch:
            raise ValueError(f"image_size {image_size} must be a multiple of patch {patch}")
        sizes = {"hidden_caps": hidden_caps, "hidden_dim": hidden_dim, "groups": groups,
                 "routing_iterations": routing_iterations, "likelihood_samples": likelihood_samples}  # fmt: skip
        for key, value in sizes.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        if hidden_caps % groups:
            raise ValueError(f"hidden_caps {hidden_caps} must be a multiple of groups {groups}")
        self.patch, self.iterations, self.samples = patch, routing_iterations, likelihood_samples
        self.caps, self.dim, self.groups = hidden_caps, hidden_dim, groups
        self.choices = hidden_caps // groups  # K: the parents a patch chooses between in one group
        grid = image_size // patch
        self.in_caps, self.in_dim = grid * grid, in_channels * patch * patch
        self.weight = nn.Parameter(torch.randn(self.in_caps, self.in_dim, hidden_caps * hidden_dim) * weight_std)
        self.pose_bias = nn.Parameter(torch.zeros(hidden_caps, hidden_dim))
        # -D log 2: a capsule with no evidence (s = 0) is on with probability 1/2
        self.switch_bias = nn.Parameter(torch.full((hidden_caps,), -hidden_dim * math.log(2)))
        self.prior = nn.Parameter(torch.zeros(self.in_caps, hidden_caps))  # pi_ij
        self.hidden_caps = PartWholeRouting(routing_iterations, grid, patch, groups)
        self.register_latent((self.in_caps * groups,))
        # A weight W_ij (and a prior logit pi_ij) sees patch i only when the patch routes to
        # capsule j, 1/K of the time while routing is undecided: its gradient is K times smaller
        # than an RBM weight's, which sees every image. Scaling it by K gives the patch weights the
        # RBM's effective learning rate (a per-parameter step size, as an adaptive optimiser would).
        for param in (self.weight, self.prior):
            param.register_hook(lambda grad: grad * self.choices)

    # --- from pixels to capsules and back ------------------------------------------------------

    def visible_caps(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` [B, C, H, W] -> visible capsules [B, P, C * patch^2] (row-major patches; as
        ``F.unfold`` with stride ``patch``, as one copy)."""
        b, c, g, p = len(v), self.image_shape[0], self.image_shape[1] // self.patch, self.patch
        return v.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)

    def image_of(self, caps: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`visible_caps`: [B, P, C * patch^2] -> ``[B, C*H*W]``."""
        b, c, g, p = len(caps), self.image_shape[0], self.image_shape[1] // self.patch, self.patch
        return caps.reshape(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, -1)

    def votes(self, v: torch.Tensor) -> torch.Tensor:
        """u_{j|i} = W_ij v_i ``[B, P, N, D]``: one batched matmul over the patches."""
        u = torch.bmm(self.visible_caps(v).transpose(0, 1), self.weight)  # [P, B, N*D]
        return u.view(self.in_caps, len(v), self.caps, self.dim).transpose(0, 1)

    def encode(self, v: torch.Tensor, hooked: bool = False) -> Routed:
        """Inference: the mean-field couplings [B, P, N] and capsules of ``v`` (``routes`` None);
        ``hooked``: through the routing layer's forward hooks (what the health probe records)."""
        u = self.votes(v)
        route = self.hidden_caps if hooked else self.hidden_caps.forward
        out = route(u, self.prior, self.switch_bias, self.pose_bias)
        return Routed(out.s, out.coupling.view(len(v), self.in_caps, self.caps), u, None)

    def inference(self, v: torch.Tensor) -> Routed:
        return self.encode(v, hooked=True)

    def chain_state(self, v: torch.Tensor, latent: torch.Tensor | None = None) -> Routed:
        """A chain's state (v, r): ``latent`` [B, P * G] the parent of each patch in each group
        (:meth:`parents`; None: uniform, the routes' distribution at beta = 0), and the routed
        capsules s_j = beta_j + sum_{i: r_i = j} W_ij v_i."""
        if latent is None:
            latent = torch.randint(self.choices, (len(v), self.in_caps * self.groups), device=v.device)
        return Routed(self._route_sum(self._chosen(self.votes(v), latent), latent), None, None, latent)

    def parents(self, routes: torch.Tensor) -> torch.Tensor:
        """The capsules j ``[B, P * G]`` that ``routes`` [B, P * G] name: entry i * G + g is patch
        i's parent in group g, an index 0..K-1 within the group (G = 1: the capsule itself)."""
        group = torch.arange(routes.shape[-1], device=routes.device) % self.groups
        return routes + self.choices * group

    def _chosen(self, votes: torch.Tensor, routes: torch.Tensor) -> torch.Tensor:
        """u_{r_i|i}: each patch's votes for its parents ``[B, P * G, D]`` from all its ``votes``
        [B, P, N, D] (a gather: the dense votes cost one matmul, cheaper than picking weights)."""
        index = self.parents(routes).view(len(routes), self.in_caps, self.groups, 1).expand(-1, -1, -1, self.dim)
        return votes.gather(2, index).view(len(routes), -1, self.dim)

    def _route_sum(self, chosen: torch.Tensor, routes: torch.Tensor) -> torch.Tensor:
        """s_j = beta_j + the sum of the vectors ``chosen`` [B, P * G, D] of the patches routed to
        j ``[B, N, D]``."""
        s = chosen.new_zeros(len(chosen), self.caps, self.dim)
        index = self.parents(routes).unsqueeze(-1).expand(-1, -1, self.dim)
        return s.scatter_add(1, index, chosen) + self.pose_bias

    def _top_down(self, routes: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        """sum_j r_ij W_ij^T (z_j h_j) for every pixel ``[B, V]``: each patch drawn by its parents
        (``routes`` [B, P * G]; ``pose`` [B, N, D]): the parents' poses placed in a [B, P, N, D]
        grid of zeros, then one batched matmul with the patches' weights."""
        b, parents = len(routes), self.parents(routes)
        parent_pose = pose.gather(1, parents.unsqueeze(-1).expand(-1, -1, self.dim))  # [B, P * G, D]
        index = parents.view(b, self.in_caps, self.groups, 1).expand(-1, -1, -1, self.dim)
        routed = pose.new_zeros(b, self.in_caps, self.caps, self.dim)
        routed.scatter_(2, index, parent_pose.view(b, self.in_caps, self.groups, self.dim))
        drawn = torch.bmm(routed.view(b, self.in_caps, -1).transpose(0, 1), self.weight.transpose(1, 2))
        return self.image_of(drawn.transpose(0, 1))

    # --- the energy and the chain --------------------------------------------------------------

    def evidence(self, s: torch.Tensor, beta: Beta = 1.0) -> torch.Tensor:
        """beta b_j + sum_d softplus(beta s_jd) ``[B, N]``: p_beta(z_j = 1 | v, r) = sigmoid of it."""
        return per_row(beta, 2) * self.switch_bias + softplus(per_row(beta, 3) * s).sum(-1)

    def hidden_energy(self, enc: Routed, beta: Beta) -> torch.Tensor:
        """log sum_{z,h} of the joint at beta, plus the routes' prior beta sum_i pi_{i r_i} ``[B]``;
        for soft couplings (mean field, ``routes`` None) the prior's expectation plus their
        entropy H(c): the bound."""
        if enc.routes is not None:
            index = self.parents(enc.routes).view(len(enc.routes), self.in_caps, self.groups)
            prior = self.prior.expand(len(index), -1, -1).gather(2, index).sum((1, 2))
            return softplus(self.evidence(enc.s, beta)).sum(-1) + per_row(beta, 1) * prior
        prior = (enc.coupling * self.prior).sum((1, 2))
        entropy = -torch.special.xlogy(enc.coupling, enc.coupling).sum((1, 2))
        return softplus(self.evidence(enc.s, beta)).sum(-1) + per_row(beta, 1) * prior + entropy

    def log_hidden_states(self) -> float:
        # routes: K per patch and group; capsules: off, or on with 2^D poses
        return self.in_caps * self.groups * math.log(self.choices) + self.caps * math.log1p(2.0**self.dim)

    def firing(self, enc: Routed) -> torch.Tensor:
        """p(z_j = 1 | v, c) ``[B, N]``: the probability that capsule j fires."""
        return torch.sigmoid(self.evidence(enc.s))

    def sample_hidden(self, enc: Routed, beta: Beta = 1.0) -> torch.Tensor:
        """z_j h_j ~ p_beta(z, h | v, r) ``[B, N, D]`` (zero where the switch is off)."""
        scaled = per_row(beta, 3) * enc.s
        on = bernoulli(torch.sigmoid(per_row(beta, 2) * self.switch_bias + softplus(scaled).sum(-1)))
        return bernoulli(torch.sigmoid(scaled)).mul_(on.unsqueeze(-1))

    def agreement(self, v: torch.Tensor, pose: torch.Tensor, votes: torch.Tensor | None = None) -> torch.Tensor:
        """z_j h_j . u_{j|i} for every patch and parent ``[B, P, N]`` (``pose`` [B, N, D] = z h;
        ``votes``: :meth:`votes` of ``v``, if at hand)."""
        return torch.einsum("bijd,bjd->bij", self.votes(v) if votes is None else votes, pose)

    def sample_routes(self, agreement: torch.Tensor, beta: Beta = 1.0) -> torch.Tensor:
        """r_i ~ p_beta(r_i | v, z, h) = softmax_j(beta (z_j h_j . u_{j|i} + pi_ij)) within each
        group ``[B, P * G]`` from the :meth:`agreement` [B, P, N] (by inverting each cumulative
        distribution at one uniform draw)."""
        logits = per_row(beta, 3) * (agreement + self.prior)
        cdf = torch.softmax(logits.reshape(len(logits), -1, self.choices), -1).cumsum_(-1)
        u = torch.rand(cdf.shape[:2], dtype=cdf.dtype, device=cdf.device).unsqueeze(-1)
        return (cdf < u).sum(-1).clamp_(max=self.choices - 1)

    def draw_routes(self, coupling: torch.Tensor) -> torch.Tensor:
        """Routes ``[B, P * G]`` drawn from couplings [B, P, N] (each group's K summing to 1)."""
        return torch.multinomial(coupling.reshape(-1, self.choices), 1).view(len(coupling), -1)

    @torch.no_grad()
    def transition(self, v, enc: Routed, beta: Beta = 1.0, base: torch.Tensor | None = None, encode: bool = True):
        """One sweep of block Gibbs on (v, r, z, h): z, h | v, r; r | v, z, h; v | r, z, h.
        ``enc`` a chain's state (:meth:`chain_state`); ``(v', state of (v', r'), acceptance 1)``."""
        if enc.routes is None:
            raise ValueError("a chain step needs the chain's routes: start it with chain_state(v)")
        pose = self.sample_hidden(enc, beta)
        routes = self.sample_routes(self.agreement(v, pose), beta)
        g = self.visible_input(self._top_down(routes, pose), beta, base)
        new = bernoulli(torch.sigmoid(g)).view_as(v)
        if not encode:
            return new, Routed(None, None, None, routes), torch.ones(len(v), device=v.device)
        chosen = self._chosen(self.votes(new), routes)
        return new, Routed(self._route_sum(chosen, routes), None, None, routes), torch.ones(len(v), device=v.device)

    @torch.no_grad()
    def up_down(self, v: torch.Tensor) -> torch.Tensor:
        """One up-down pass: r ~ the mean-field couplings of v, z, h ~ p(z, h | v, r), then
        p(v = 1 | r, z, h)."""
        state = self.chain_state(v, self.draw_routes(self.encode(v).coupling))
        g = self._top_down(state.routes, self.sample_hidden(state)) + self.visible_bias
        return torch.sigmoid(g).view_as(v)

    # --- likelihood ------------------------------------------------------------------------------

    @torch.no_grad()
    def marginal_free_energy(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-log of the importance-sampled unnormalised p(v) ``[B]`` and the spread (standard
        deviation) of the K = ``likelihood_samples`` log weights ``[B]``: r_k ~ q = the mean-field
        couplings, w_k = e^{-F(v, r_k)} / q(r_k); mean_k w_k is unbiased for sum_r e^{-F(v, r)}."""
        enc = self.encode(v)
        log_q_all = enc.coupling.clamp_min(1e-30).log()  # [B, P, N]
        weights = []
        for _ in range(self.samples):
            routes = self.draw_routes(enc.coupling)
            state = Routed(self._route_sum(self._chosen(enc.votes, routes), routes), None, None, routes)
            log_q = log_q_all.view(len(v), -1, self.choices).gather(2, routes.unsqueeze(-1)).sum((1, 2))
            weights.append(-self.free_energy_at(v, state).double() - log_q.double())
        log_w = torch.stack(weights)  # [K, B]
        estimate = torch.logsumexp(log_w, 0) - math.log(self.samples)
        spread = log_w.std(0) if self.samples > 1 else torch.zeros_like(estimate)
        return -estimate, spread
