"""Kubernetes: an Indexed Job of dist_train workers (see job.yaml)."""
