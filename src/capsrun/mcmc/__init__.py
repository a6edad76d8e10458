"""Samplers and estimators for binary-visible energy models, as algorithms, not models.

- :mod:`~capsrun.mcmc.base`: what a model must offer them (:class:`~capsrun.mcmc.base.EnergyChain`)
  and the base-rate model every ladder and annealing starts from.
- :mod:`~capsrun.mcmc.tempering`: parallel tempering: ladders, their re-spacing, one sweep.
- :mod:`~capsrun.mcmc.chains`: chains from a start, plain or tempered, set by one
  :class:`~capsrun.mcmc.chains.ChainSpec`.
- :mod:`~capsrun.mcmc.ais`: annealed importance sampling of log Z.

Nothing here reads a config, a file or a model class: any object with the protocol's methods
(the RBM and the capsule RBM of :mod:`capsrun.models`) is sampled the same way.
"""
