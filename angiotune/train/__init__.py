"""Training: the plain-PyTorch step and evaluation, and the Ray Train loop that wraps them."""
