"""Cluster resolvers built from fake SLURM and TF_CONFIG environments.

Resolving a cluster reads the environment and lists physical devices only, so
it runs in the test process; the strategies themselves are exercised in
`test_multi_worker.py`, in processes of their own.
"""

import json
import os

import pytest
import tensorflow as tf

from dist_train.distribute import cluster
from dist_train.distribute import strategy as strategy_lib


@pytest.fixture
def environ(monkeypatch):
  """os.environ without the cluster of the machine running the tests."""
  for name in list(os.environ):
    if name == "TF_CONFIG" or name.startswith("SLURM_"):
      monkeypatch.delenv(name)
  return monkeypatch


def _resolver(cluster_flag="auto", **kwargs):
  resolved = cluster.resolve(strategy="auto", cluster=cluster_flag,
                             cpu_replicas=None, environ=os.environ)
  return strategy_lib.create_cluster_resolver(resolved, **kwargs)


@pytest.mark.parametrize("visible_gpus", [0, 3])
def test_slurm_step_of_two_nodes_becomes_a_cluster_of_four_workers(
    environ, monkeypatch, visible_gpus):
  environ.setenv("SLURM_PROCID", "3")
  environ.setenv("SLURM_STEP_NUM_TASKS", "4")
  environ.setenv("SLURM_STEP_NODELIST", "gpu[07-08]")
  environ.setenv("SLURM_STEP_TASKS_PER_NODE", "2(x2)")
  visible_before = os.environ.get("CUDA_VISIBLE_DEVICES")
  # The GPUs this task sees, whatever the machine running the test has.
  get_visible_devices = tf.config.get_visible_devices
  monkeypatch.setattr(tf.config, "get_visible_devices", lambda kind=None: (
      [f"gpu{i}" for i in range(visible_gpus)] if kind == "GPU" else
      get_visible_devices(kind)))

  resolver = _resolver("slurm", slurm_port_base=9100)

  assert resolver.cluster_spec().as_dict() == {"worker": [
      "gpu07:9100", "gpu07:9101", "gpu08:9100", "gpu08:9101"]}
  assert (resolver.task_type, resolver.task_id) == ("worker", 3)
  # The strategy uses the GPUs the task sees (0 means one CPU replica), not
  # the 1 GPU per task of the layout SlurmClusterResolver is given.
  assert resolver.num_accelerators() == {"GPU": visible_gpus}
  assert os.environ.get("CUDA_VISIBLE_DEVICES") == visible_before


def test_uneven_slurm_step_on_one_host(environ):
  environ.setenv("SLURM_PROCID", "0")
  environ.setenv("SLURM_STEP_NUM_TASKS", "3")
  environ.setenv("SLURM_STEP_NODELIST", "a1,b2")
  environ.setenv("SLURM_STEP_TASKS_PER_NODE", "2,1")
  resolver = _resolver()  # auto
  assert resolver.cluster_spec().as_dict() == {
      "worker": ["a1:8888", "a1:8889", "b2:8888"]}
  assert (resolver.task_type, resolver.task_id) == ("worker", 0)


def test_tf_config_cluster(environ):
  environ.setenv("TF_CONFIG", json.dumps({
      "cluster": {"chief": ["h0:20"], "worker": ["h1:21", "h2:22"]},
      "task": {"type": "worker", "index": 1}}))
  resolver = _resolver()
  assert resolver.cluster_spec().as_dict() == {
      "chief": ["h0:20"], "worker": ["h1:21", "h2:22"]}
  assert (resolver.task_type, resolver.task_id) == ("worker", 1)


def test_no_cluster_gives_an_empty_one(environ):
  resolver = _resolver()
  assert resolver.cluster_spec().as_dict() == {}
