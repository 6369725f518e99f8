"""Deployment: targets (local processes, docker containers, Kubernetes), Bentos and images, the chart's
values and the helm binary."""
