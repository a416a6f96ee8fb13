"""HHG: a hierarchical hybrid generator (VAE, latent diffusion, GAN refiner) refining coarse cells."""
