"""SeFA basis, latent subspaces and the dormancy curve."""

from .basis import LatentBasis, sefa
from .dormancy import dormancy_curve

__all__ = ["LatentBasis", "dormancy_curve", "sefa"]
