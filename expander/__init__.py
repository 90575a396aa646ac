"""expander: domain expansion of image generators.

One pretrained StyleGAN2 learns many new domains, each on its own repurposed dormant latent
direction, while the source domain stays intact (Nitzan et al., CVPR 2023).
"""

from .checkpoint import ExpandedGenerator
from .domains import Domain
from .generators.stylegan2 import Discriminator, Generator, StyleGAN2Config
from .hub import load_model
from .subspace.basis import LatentBasis, sefa

__all__ = ["Discriminator", "Domain", "ExpandedGenerator", "Generator", "LatentBasis", "StyleGAN2Config", "load_model", "sefa"]
__version__ = "0.1.0"
