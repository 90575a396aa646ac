"""SeFA basis, latent subspaces and the dormancy curve."""

from .basis import LatentBasis, sefa

__all__ = ["LatentBasis", "sefa"]
