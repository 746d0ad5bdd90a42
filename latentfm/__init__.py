"""latentfm: 3D VQ-GAN + latent rectified flow matching for synthetic brain MRI."""

__version__ = "0.1.0"
