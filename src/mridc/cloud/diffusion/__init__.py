"""BPCG, part 2: controllable diffusion reconstruction. Model, noise schedule and sampler are separate
pieces (as diffusers separates models, schedulers and pipelines)."""
