"""Training: the plain-PyTorch step and evaluation, and the Ray loop that wraps them."""
