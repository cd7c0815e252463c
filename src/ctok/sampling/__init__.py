"""The latent generators' processes and samplers: SiT's flow path (ODE/SDE integration), DiT's Gaussian diffusion.

Each process object also defines its model's training loss, so that training and sampling share it.
"""
from ctok.sampling.flow import FlowPath, sample_sit
from ctok.sampling.gaussian_diffusion import GaussianDiffusion, sample_dit

__all__ = ["FlowPath", "GaussianDiffusion", "sample_dit", "sample_sit"]
