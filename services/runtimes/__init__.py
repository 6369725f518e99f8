"""Runtimes: one file each; ``Runtime.registry()`` finds them."""
