"""Serving: the runtimes (one file each in ``runtimes/``) and the one generic BentoML service."""
