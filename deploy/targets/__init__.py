"""Deployment targets, one file each: where a ServiceSpec is served and an Endpoint comes from."""
