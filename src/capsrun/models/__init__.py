"""Model variants, one file each. Models never see a config: :mod:`capsrun.build` makes them.

Each is a plain ``nn.Module`` whose constructor defaults are the paper's architecture, usable
outside Hydra and capsrun's runs::

    from capsrun.models import CapsNet
    net = CapsNet()                          # arXiv:1710.09829: 28x28x1 inputs, 10 classes, 3 iterations
    out = net(torch.rand(8, 1, 28, 28))      # out.scores [8, 10]: the class capsules' lengths

Their losses: :class:`capsrun.losses.CapsNetLoss`, :class:`VCapsLoss`, :class:`RBMLoss`,
:class:`CrossEntropyObjective`.
"""

from capsrun.models.baseline_cnn import BaselineCNN, BaselineCNNMulti, CrossEntropyObjective
from capsrun.models.capsnet import CapsNet
from capsrun.models.capsrbm import CapsuleRBM
from capsrun.models.deep_capsnet import DeepCapsNet
from capsrun.models.energy import RBMLoss
from capsrun.models.rbm import RBM
from capsrun.models.vcaps import VariationalCapsNet, VCapsLoss

__all__ = [
    "RBM",
    "BaselineCNN",
    "BaselineCNNMulti",
    "CapsNet",
    "CapsuleRBM",
    "CrossEntropyObjective",
    "DeepCapsNet",
    "RBMLoss",
    "VCapsLoss",
    "VariationalCapsNet",
]
