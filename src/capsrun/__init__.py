"""capsrun: a Hydra-driven experiment runner for capsule networks.

From Python: ``capsrun.load(path)`` (a trained model, its config and metrics),
``capsrun.runs(dir)`` (a sweep's final metrics as a pandas DataFrame), ``capsrun.scalars(dir,
tags)`` (its TensorBoard curves); the models are ``capsrun.models.CapsNet``, ... (see
:mod:`capsrun.api`). The names load on first use, so that ``capsrun --help`` starts without torch.
"""

__version__ = "0.1.0"
__all__ = ["Run", "load", "runs", "scalars"]


def __getattr__(name: str):
    if name in __all__:
        from capsrun import api

        return getattr(api, name)
    raise AttributeError(f"module 'capsrun' has no attribute {name!r}")
