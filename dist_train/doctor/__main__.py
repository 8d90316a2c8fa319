"""`python -m dist_train.doctor`: see dist_train/doctor/__init__.py."""

from dist_train.doctor import cli

if __name__ == "__main__":
  cli.run_cli()
