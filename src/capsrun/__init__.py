"""capsrun: a Hydra-driven experiment runner for capsule networks."""

__version__ = "0.1.0"
