"""Entry points that start dist_train workers on a host, a SLURM job or Kubernetes."""
