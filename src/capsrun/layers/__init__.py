"""Reusable capsule pieces: pure functions and small modules that know nothing of configs."""

from capsrun.layers.capsules import PrimaryCaps, RoutedCaps
from capsrun.layers.routing import RoutingResult, coupling_coefficients, dynamic_routing
from capsrun.layers.squash import safe_norm, squash

__all__ = [
    "PrimaryCaps",
    "RoutedCaps",
    "RoutingResult",
    "coupling_coefficients",
    "dynamic_routing",
    "safe_norm",
    "squash",
]
