"""How the launchers start workers: TF_CONFIG, ports, GPU shares, commands."""

import json
import socket

import pytest

from launch import workers
from tests.helpers import processes

ConfigError = workers.ConfigError

def test_make_tf_config_names_every_worker_and_this_task():
  tf_config = workers.make_tf_config(["a:1", "b:2", "c:3"], 2)
  assert tf_config == {"cluster": {"worker": ["a:1", "b:2", "c:3"]},
                       "task": {"type": "worker", "index": 2}}
  with pytest.raises(ValueError, match=r"index must be in \[0, 3\), got 3"):
    workers.make_tf_config(["a:1", "b:2", "c:3"], 3)


def test_free_ports_are_distinct_and_bindable():
  ports = workers.free_ports(3)
  assert len(set(ports)) == 3
  for port in ports:
    with socket.socket() as s:
      s.bind((workers.LOOPBACK, port))


def test_local_worker_envs_give_each_worker_its_task_and_gpus():
  envs = workers.local_worker_envs(3, base_env={"KEEP": "1"},
                                   gpus_per_worker=2, ports=[11, 12, 13])
  assert [json.loads(env["TF_CONFIG"]) for env in envs] == [
      {"cluster": {"worker": ["127.0.0.1:11", "127.0.0.1:12", "127.0.0.1:13"]},
       "task": {"type": "worker", "index": i}} for i in range(3)]
  assert [env["CUDA_VISIBLE_DEVICES"] for env in envs] == ["0,1", "2,3", "4,5"]
  assert all(env["KEEP"] == "1" for env in envs)


def test_local_worker_envs_leave_or_hide_gpus():
  base = {"CUDA_VISIBLE_DEVICES": "3"}
  assert [e["CUDA_VISIBLE_DEVICES"] for e in workers.local_worker_envs(
      2, base_env=base, ports=[1, 2])] == ["3", "3"]
  assert [e["CUDA_VISIBLE_DEVICES"] for e in workers.local_worker_envs(
      2, base_env=base, gpus_per_worker=0, ports=[1, 2])] == ["", ""]


def test_local_worker_envs_share_out_the_launchers_gpus():
  base = {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
  assert [e["CUDA_VISIBLE_DEVICES"] for e in workers.local_worker_envs(
      2, base_env=base, gpus_per_worker=2, ports=[1, 2])] == ["4,5", "6,7"]
  with pytest.raises(ValueError, match=(
      "worker 1 needs GPUs 3..5 of CUDA_VISIBLE_DEVICES=4,5,6,7, which has 4")):
    workers.local_worker_envs(2, base_env=base, gpus_per_worker=3,
                              ports=[1, 2])


def test_worker_command_runs_the_cli():
  assert workers.worker_command(["--epochs=1"], python="py") == [
      "py", "-m", "dist_train.main", "--epochs=1"]
  # A wrapper command that ends in the interpreter (launch.local --python).
  assert workers.worker_command(["--epochs=1"], python=["env", "py"]) == [
      "env", "py", "-m", "dist_train.main", "--epochs=1"]


def test_indexed_job_tf_config_addresses_pods_through_the_service():
  tf_config = workers.indexed_job_tf_config(
      job_name="dist-train", service="workers", num_workers=3, index=1,
      port=2222)
  assert tf_config == {
      "cluster": {"worker": ["dist-train-0.workers:2222",
                             "dist-train-1.workers:2222",
                             "dist-train-2.workers:2222"]},
      "task": {"type": "worker", "index": 1}}


def test_indexed_job_environment_reads_the_pod_index():
  env = workers.indexed_job_environment(
      {"JOB_COMPLETION_INDEX": "2"}, job_name="j", service="s", num_workers=3,
      port=2222)
  assert json.loads(env["TF_CONFIG"])["task"] == {"type": "worker", "index": 2}
  with pytest.raises(ConfigError, match=r"must be in \[0, 3\) for "
                                        r"--num_workers=3, got 3"):
    workers.indexed_job_environment(
        {"JOB_COMPLETION_INDEX": "3"}, job_name="j", service="s",
        num_workers=3, port=2222)
  with pytest.raises(ConfigError, match="got None"):
    workers.indexed_job_environment({}, job_name="j", service="s",
                                    num_workers=3, port=2222)


def test_k8s_worker_gives_dist_train_the_tf_config_of_its_pod(tmp_path):
  result = processes.run_python(
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


