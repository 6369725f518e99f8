"""Optimizers: one file each; ``Optimizer.registry()`` finds them."""
