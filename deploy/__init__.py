"""Deployment targets: local processes (the default) and, later, Kubernetes through the Helm chart."""
