"""Samplers for the latent generators: SiT by flow ODE/SDE integration, DiT by Gaussian diffusion."""
from ctok.sampling.flow import sample_sit
from ctok.sampling.gaussian_diffusion import GaussianDiffusion, sample_dit

__all__ = ["GaussianDiffusion", "sample_dit", "sample_sit"]
