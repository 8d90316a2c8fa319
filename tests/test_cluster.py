"""Cluster descriptions without a cluster: TF_CONFIG, SLURM steps, workers."""

import json
import socket

import pytest

from dist_train import cluster
from dist_train import config as config_lib
from tests import conftest

ConfigError = config_lib.ConfigError


def _config(**overrides):
  return config_lib.Config(model_dir="/tmp/dist_train_test_cluster",
                           **overrides)


def _tf_config(num_workers, index):
  return json.dumps(cluster.make_tf_config(
      [f"127.0.0.1:{2000 + i}" for i in range(num_workers)], index))


def _slurm_env(proc_id, num_tasks, nodelist="node[1-2]",
               tasks_per_node="2(x2)"):
  return {"SLURM_PROCID": str(proc_id),
          "SLURM_STEP_NUM_TASKS": str(num_tasks),
          "SLURM_STEP_NODELIST": nodelist,
          "SLURM_STEP_TASKS_PER_NODE": tasks_per_node}


# TF_CONFIG.


def test_make_tf_config_names_every_worker_and_this_task():
  tf_config = cluster.make_tf_config(["a:1", "b:2", "c:3"], 2)
  assert tf_config == {"cluster": {"worker": ["a:1", "b:2", "c:3"]},
                       "task": {"type": "worker", "index": 2}}
  with pytest.raises(ValueError, match=r"index must be in \[0, 3\), got 3"):
    cluster.make_tf_config(["a:1", "b:2", "c:3"], 3)


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
  assert cluster.find_cluster(_config(), environ) == expected


def test_explicit_cluster_needs_its_environment():
  with pytest.raises(ConfigError,
                     match="--cluster=tf_config needs the TF_CONFIG"):
    cluster.find_cluster(_config(cluster="tf_config"), _slurm_env(0, 2))
  with pytest.raises(ConfigError, match="--cluster=slurm needs a SLURM job "):
    cluster.find_cluster(_config(cluster="slurm"),
                         {"TF_CONFIG": _tf_config(2, 0)})
  assert cluster.find_cluster(_config(cluster="slurm"),
                              {"TF_CONFIG": _tf_config(2, 0),
                               **_slurm_env(1, 2)}) == "slurm"


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
  assert cluster.resolve_strategy(_config(**overrides), environ) == expected


def test_single_host_strategy_on_a_cluster_is_refused():
  with pytest.raises(ConfigError, match=(
      r"--strategy=mirrored trains on one host, but this process is one of 2 "
      r"tasks of a cluster \(from TF_CONFIG\)")):
    cluster.resolve_strategy(_config(strategy="mirrored"),
                             {"TF_CONFIG": _tf_config(2, 0)})


def test_cpu_replicas_on_a_cluster_is_refused():
  with pytest.raises(ConfigError, match=(
      r"--cpu_replicas cannot be combined with a cluster of 4 tasks \(from "
      r"the SLURM job step\).*got --cpu_replicas=2")):
    cluster.resolve_strategy(_config(cpu_replicas=2), _slurm_env(0, 4))


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
  result = conftest.run_cli(f"--model_dir={tmp_path}",
                            "--strategy=multi_worker", "--cpu_replicas=2",
                            timeout=60)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "dist_train: error: --cpu_replicas cannot be combined with "
      "--strategy=multi_worker: on CPU each worker is one replica, so start "
      "more workers instead (got --cpu_replicas=2)")


def test_cli_refuses_a_broken_tf_config_before_training(tmp_path):
  result = conftest.run_python(
      ["-m", "dist_train.main", f"--model_dir={tmp_path}"], timeout=60,
      env_overrides={"TF_CONFIG": '{"cluster": {"worker": ["h0:1"]}'})
  assert result.returncode == 1
  assert "dist_train: error: TF_CONFIG must be JSON" in result.stderr
  assert not (tmp_path / "checkpoints").exists()


# Starting workers.


def test_free_ports_are_distinct_and_bindable():
  ports = cluster.free_ports(3)
  assert len(set(ports)) == 3
  for port in ports:
    with socket.socket() as s:
      s.bind((cluster.LOOPBACK, port))


def test_local_worker_envs_give_each_worker_its_task_and_gpus():
  envs = cluster.local_worker_envs(3, base_env={"KEEP": "1"},
                                   gpus_per_worker=2, ports=[11, 12, 13])
  assert [json.loads(env["TF_CONFIG"]) for env in envs] == [
      {"cluster": {"worker": ["127.0.0.1:11", "127.0.0.1:12", "127.0.0.1:13"]},
       "task": {"type": "worker", "index": i}} for i in range(3)]
  assert [env["CUDA_VISIBLE_DEVICES"] for env in envs] == ["0,1", "2,3", "4,5"]
  assert all(env["KEEP"] == "1" for env in envs)


def test_local_worker_envs_leave_or_hide_gpus():
  base = {"CUDA_VISIBLE_DEVICES": "3"}
  assert [e["CUDA_VISIBLE_DEVICES"] for e in cluster.local_worker_envs(
      2, base_env=base, ports=[1, 2])] == ["3", "3"]
  assert [e["CUDA_VISIBLE_DEVICES"] for e in cluster.local_worker_envs(
      2, base_env=base, gpus_per_worker=0, ports=[1, 2])] == ["", ""]


def test_local_worker_envs_share_out_the_launchers_gpus():
  base = {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
  assert [e["CUDA_VISIBLE_DEVICES"] for e in cluster.local_worker_envs(
      2, base_env=base, gpus_per_worker=2, ports=[1, 2])] == ["4,5", "6,7"]
  with pytest.raises(ValueError, match=(
      "worker 1 needs GPUs 3..5 of CUDA_VISIBLE_DEVICES=4,5,6,7, which has 4")):
    cluster.local_worker_envs(2, base_env=base, gpus_per_worker=3,
                              ports=[1, 2])


def test_worker_command_runs_the_cli():
  assert cluster.worker_command(["--epochs=1"], python="py") == [
      "py", "-m", "dist_train.main", "--epochs=1"]


def test_indexed_job_tf_config_addresses_pods_through_the_service():
  tf_config = cluster.indexed_job_tf_config(
      job_name="dist-train", service="workers", num_workers=3, index=1,
      port=2222)
  assert tf_config == {
      "cluster": {"worker": ["dist-train-0.workers:2222",
                             "dist-train-1.workers:2222",
                             "dist-train-2.workers:2222"]},
      "task": {"type": "worker", "index": 1}}


def test_indexed_job_environment_reads_the_pod_index():
  env = cluster.indexed_job_environment(
      {"JOB_COMPLETION_INDEX": "2"}, job_name="j", service="s", num_workers=3,
      port=2222)
  assert json.loads(env["TF_CONFIG"])["task"] == {"type": "worker", "index": 2}
  with pytest.raises(ConfigError, match=r"must be in \[0, 3\) for "
                                        r"--num_workers=3, got 3"):
    cluster.indexed_job_environment(
        {"JOB_COMPLETION_INDEX": "3"}, job_name="j", service="s",
        num_workers=3, port=2222)
  with pytest.raises(ConfigError, match="got None"):
    cluster.indexed_job_environment({}, job_name="j", service="s",
                                    num_workers=3, port=2222)


def test_k8s_worker_gives_dist_train_the_tf_config_of_its_pod(tmp_path):
  result = conftest.run_python(
      ["-m", "launch.k8s.worker", "--job_name=dist-train",
       "--service=workers", "--num_workers=3", "--",
       f"--model_dir={tmp_path}", "--strategy=mirrored"],
      timeout=60, env_overrides={"JOB_COMPLETION_INDEX": "1"})
  # dist_train.main received a TF_CONFIG of 3 tasks, which contradicts
  # --strategy=mirrored.
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "dist_train: error: --strategy=mirrored trains on one host, but this "
      "process is one of 3 tasks of a cluster (from TF_CONFIG); use "
      "--strategy=multi_worker or auto")


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
    flags.FLAGS(["dist_train", f"--flagfile={conftest.FLAGS_DIR}/{flagfile}",
                 "--model_dir=/tmp/dist_train_test_flagfile"])
    config = flags_lib.config_from_flags()
  assert (config.strategy, config.collective) == (strategy, collective)
  assert config.dataset == "mnist"
