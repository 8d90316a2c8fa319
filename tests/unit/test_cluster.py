"""Cluster detection without a cluster: TF_CONFIG, SLURM steps, the strategy."""

import json

import pytest

from dist_train.distribute import cluster
from dist_train.distribute import cluster as cluster_lib
from dist_train import config as config_lib
from tests.helpers import processes

ConfigError = config_lib.ConfigError


def _config(**overrides):
  return config_lib.Config(model_dir="/tmp/dist_train_test_cluster",
                           **overrides)


def _tf_config(num_workers, index):
  return json.dumps({
      "cluster": {"worker": [f"127.0.0.1:{2000 + i}"
                             for i in range(num_workers)]},
      "task": {"type": "worker", "index": index}})


def _resolve(environ, strategy="auto", cluster="auto", cpu_replicas=None):
  return cluster_lib.resolve(strategy=strategy, cluster=cluster,
                             cpu_replicas=cpu_replicas, environ=environ)


def _slurm_env(proc_id, num_tasks, nodelist="node[1-2]",
               tasks_per_node="2(x2)"):
  return {"SLURM_PROCID": str(proc_id),
          "SLURM_STEP_NUM_TASKS": str(num_tasks),
          "SLURM_STEP_NODELIST": nodelist,
          "SLURM_STEP_TASKS_PER_NODE": tasks_per_node}


# TF_CONFIG.


def test_parse_tf_config_accepts_chief_and_workers():
  value = json.dumps({"cluster": {"chief": ["h0:1"],
                                  "worker": ["h1:1", "h2:1"]},
                      "task": {"type": "worker", "index": 1}})
  assert cluster.num_tf_config_tasks(cluster.parse_tf_config(value)) == 3


@pytest.mark.parametrize("value, message", [
    ("{not json", "TF_CONFIG must be JSON"),
    ("[1, 2]", "TF_CONFIG must be a JSON object"),
    (json.dumps({"cluster": {"worker": ["h0:1"], "ps": ["h1:1"]},
                 "task": {"type": "worker", "index": 0}}),
     "only chief and worker tasks .* got ps"),
    (json.dumps({"cluster": {"worker": ["h0:1", "h1:1"]},
                 "task": {"type": "worker", "index": 2}}),
     "TF_CONFIG task must name a task of its cluster"),
    (json.dumps({"cluster": {"worker": ["h0"]},
                 "task": {"type": "worker", "index": 0}}),
     "lists of host:port"),
    (json.dumps({"cluster": {"chief": ["h0:1", "h1:1"]},
                 "task": {"type": "chief", "index": 0}}),
     "one chief"),
])
def test_parse_tf_config_refuses_what_multi_worker_cannot_run(value, message):
  with pytest.raises(ConfigError, match=message):
    cluster.parse_tf_config(value)


# SLURM.


def test_slurm_step_is_read_from_an_srun_task():
  step = cluster.slurm_step(_slurm_env(3, 4))
  assert step == cluster.SlurmStep(proc_id=3, num_tasks=4,
                                   nodelist="node[1-2]", tasks_per_node="2(x2)")


def test_no_slurm_step_outside_srun():
  # sbatch and salloc shells set job variables, but no step task count.
  assert cluster.slurm_step({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4",
                             "SLURM_PROCID": "0"}) is None


def test_incomplete_or_malformed_slurm_step_is_refused():
  env = _slurm_env(0, 2)
  del env["SLURM_STEP_NODELIST"]
  with pytest.raises(ConfigError, match="lacks SLURM_STEP_NODELIST"):
    cluster.slurm_step(env)
  with pytest.raises(ConfigError,
                     match=r"SLURM_PROCID must be in \[0, 2\), got 2"):
    cluster.slurm_step(_slurm_env(2, 2))
  with pytest.raises(ConfigError, match="must be integers"):
    cluster.slurm_step(_slurm_env("x", 2))


# Which cluster and which strategy.


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"TF_CONFIG": _tf_config(2, 1)}, "tf_config"),
    (_slurm_env(1, 4), "slurm"),
    (_slurm_env(0, 1, "node1", "1"), None),  # A one-task step is no cluster.
    # TF_CONFIG wins over the SLURM step it may run inside of.
    ({"TF_CONFIG": _tf_config(2, 0), **_slurm_env(1, 4)}, "tf_config"),
])
def test_auto_finds_the_cluster(environ, expected):
  assert _resolve(environ).cluster == expected


def test_explicit_cluster_needs_its_environment():
  with pytest.raises(ConfigError,
                     match="--cluster=tf_config needs the TF_CONFIG"):
    _resolve(_slurm_env(0, 2), cluster="tf_config")
  with pytest.raises(ConfigError, match="--cluster=slurm needs a SLURM job "):
    _resolve({"TF_CONFIG": _tf_config(2, 0)}, cluster="slurm")
  resolved = _resolve({"TF_CONFIG": _tf_config(2, 0), **_slurm_env(1, 2)},
                      cluster="slurm")
  assert (resolved.cluster, resolved.num_workers) == ("slurm", 2)


@pytest.mark.parametrize("overrides, environ, expected", [
    ({}, {}, "mirrored"),
    ({}, {"TF_CONFIG": _tf_config(1, 0)}, "mirrored"),
    ({}, {"TF_CONFIG": _tf_config(3, 2)}, "multi_worker"),
    ({}, _slurm_env(1, 4), "multi_worker"),
    ({"strategy": "multi_worker"}, {}, "multi_worker"),  # One worker.
    ({"strategy": "one_device"}, {}, "one_device"),
    ({"cpu_replicas": 2}, {}, "mirrored"),
])
def test_resolve_strategy(overrides, environ, expected):
  assert _resolve(environ, **overrides).strategy == expected


def test_single_host_strategy_on_a_cluster_is_refused():
  with pytest.raises(ConfigError, match=(
      r"--strategy=mirrored trains on one host, but this process is one of 2 "
      r"tasks of a cluster \(from TF_CONFIG\)")):
    _resolve({"TF_CONFIG": _tf_config(2, 0)}, strategy="mirrored")


def test_cpu_replicas_on_a_cluster_is_refused():
  with pytest.raises(ConfigError, match=(
      r"--cpu_replicas cannot be combined with a cluster of 4 tasks \(from "
      r"the SLURM job step\).*got --cpu_replicas=2")):
    _resolve(_slurm_env(0, 4), cpu_replicas=2)


# The flags.


def test_cpu_replicas_with_multi_worker_is_refused():
  with pytest.raises(ConfigError, match=(
      "--cpu_replicas cannot be combined with --strategy=multi_worker: on CPU "
      "each worker is one replica, so start more workers instead "
      r"\(got --cpu_replicas=2\)")):
    _config(strategy="multi_worker", cpu_replicas=2)


@pytest.mark.parametrize("overrides, message", [
    ({"cluster": "k8s"},
     "--cluster must be one of auto|tf_config|slurm, got 'k8s'"),
    ({"collective": "mpi"}, "--collective must be one of auto|ring|nccl"),
    ({"collective_timeout_s": 0},
     "--collective_timeout_s must be positive, got 0"),
    ({"slurm_port_base": 70000},
     "--slurm_port_base must be a port number, got 70000"),
    ({"collective": "nccl", "strategy": "mirrored"},
     "--collective=nccl applies to --strategy=multi_worker"),
])
def test_bad_multi_worker_flags_are_refused(overrides, message):
  with pytest.raises(ConfigError, match=message):
    _config(**overrides)


def test_cli_refuses_cpu_replicas_with_multi_worker_before_training(tmp_path):
  result = processes.run_cli(f"--model_dir={tmp_path}",
                            "--strategy=multi_worker", "--cpu_replicas=2",
                            timeout=60)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "dist_train: error: --cpu_replicas cannot be combined with "
      "--strategy=multi_worker: on CPU each worker is one replica, so start "
      "more workers instead (got --cpu_replicas=2)")


def test_cli_refuses_a_broken_tf_config_before_training(tmp_path):
  result = processes.run_python(
      ["-m", "dist_train.main", f"--model_dir={tmp_path}"], timeout=60,
      env_overrides={"TF_CONFIG": '{"cluster": {"worker": ["h0:1"]}'})
  assert result.returncode == 1
  assert "dist_train: error: TF_CONFIG must be JSON" in result.stderr
  assert not (tmp_path / "checkpoints").exists()


# Starting workers.


@pytest.mark.parametrize("flagfile, strategy, collective", [
    ("gpu_node.cfg", "mirrored", "auto"),
    ("multi_node.cfg", "multi_worker", "nccl"),
])
def test_scale_out_flagfiles_make_valid_configs(flagfile, strategy, collective):
  # pylint: disable=import-outside-toplevel
  from absl import flags
  from absl.testing import flagsaver
  from dist_train import flags as flags_lib
  # pylint: enable=import-outside-toplevel
  with flagsaver.flagsaver():
    flags.FLAGS(["dist_train", f"--flagfile={processes.FLAGS_DIR}/{flagfile}",
                 "--model_dir=/tmp/dist_train_test_flagfile"])
    config = flags_lib.config_from_flags()
  assert (config.strategy, config.collective) == (strategy, collective)
  assert config.dataset == "mnist"
