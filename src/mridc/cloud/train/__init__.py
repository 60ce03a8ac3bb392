"""Training commands for the cloud models (tokenizer, predictor, diffusion). CPU by default, CUDA when present."""
