"""The doctor's parts without TensorFlow: its report lines, the all-reduce's
expected value, the peer an error names, its flags, and the rendezvous of
the workers (real sockets on 127.0.0.1, in threads of this process)."""

import socket
import threading
import time

import pytest

from dist_train.doctor import checks
from dist_train.doctor import cli
from dist_train.doctor import rendezvous
from dist_train.doctor import report
from launch import workers
from tests.helpers import processes

Task = rendezvous.Task


# The report.


def test_a_build_without_cuda_says_so():
  lines = report.format_build_info({"is_cuda_build": False,
                                    "is_rocm_build": False})
  assert lines == ["  CUDA         none: TensorFlow was built without CUDA"]


def test_a_cuda_build_names_cuda_cudnn_and_nccl():
  lines = report.format_build_info({
      "is_cuda_build": True, "cuda_version": "12.5.1", "cudnn_version": "9",
      "cuda_compute_capabilities": ["sm_80", "sm_90"]})
  assert lines == [
      "  CUDA         12.5.1 (compute capabilities sm_80, sm_90)",
      "  cuDNN        9",
      "  NCCL         not reported by this TensorFlow build"]
  nccl = report.format_build_info({"is_cuda_build": True,
                                   "nccl_version": "2.21.5"})[2]
  assert nccl == "  NCCL         2.21.5"


def test_a_gpu_line_names_its_model_capability_and_memory():
  line = report.format_device(
      "/device:GPU:0", "GPU",
      details={"device_name": "NVIDIA A100-SXM4-40GB",
               "compute_capability": (8, 0)},
      memory={"current": 3 * 2**20, "peak": 512 * 2**20})
  assert line == ("/device:GPU:0 (GPU, NVIDIA A100-SXM4-40GB, compute "
                  "capability 8.0, memory in use 3 MiB, peak 512 MiB)")
  assert report.format_device("/device:CPU:0", "CPU",
                              memory={"current": 0, "peak": 0}) == (
                                  "/device:CPU:0 (CPU)")


def test_devices_then_the_replicas():
  assert report.format_devices(["/device:CPU:0 (CPU)", "/device:CPU:1 (CPU)"],
                               ["/cpu:0", "/cpu:1"]) == [
      "  visible      /device:CPU:0 (CPU)",
      "               /device:CPU:1 (CPU)",
      "  replicas     2: /cpu:0, /cpu:1"]


def test_this_task_and_its_peers_of_a_cluster_spec():
  spec = {"chief": ["a:1"], "worker": ["b:2", "c:3"]}
  me, peers = report.cluster_tasks(spec, "worker", 0)
  assert me == Task("worker 0", "b:2")
  assert peers == [Task("chief 0", "a:1"), Task("worker 1", "c:3")]
  me, peers = report.cluster_tasks(spec, "chief", 0)
  assert me == Task("chief 0", "a:1")
  assert [p.name for p in peers] == ["worker 0", "worker 1"]


def test_the_cluster_lines():
  assert report.format_cluster(None, None, [])[0].startswith(
      "  cluster      none: this process trains alone")
  me, peers = Task("worker 1", "h1:8889"), [Task("worker 0", "h0:8888")]
  assert report.format_cluster("slurm", me, peers) == [
      "  cluster      from the SLURM job step, 2 workers; this is worker 1 "
      "(h1:8889)",
      "  peer         worker 0 (h0:8888)"]
  assert report.format_cluster("tf_config", me, []) == [
      "  cluster      from TF_CONFIG, 1 worker; this is worker 1 (h1:8889)"]


def test_a_task_splits_its_address():
  assert (Task("worker 0", "127.0.0.1:23456").host,
          Task("worker 0", "127.0.0.1:23456").port) == ("127.0.0.1", 23456)
  assert Task("worker 0", "[::1]:80").host == "::1"
  assert str(Task("worker 1", "h:1")) == "worker 1 (h:1)"


# The all-reduce's value.


@pytest.mark.parametrize("num_replicas,expected", [(1, 1), (2, 3), (4, 10)])
def test_the_expected_sum_counts_every_replica_of_every_worker(
    num_replicas, expected):
  assert checks.expected_sum(num_replicas) == expected


def test_the_right_sum_on_every_replica_passes():
  line = checks.check_all_reduce([3.0, 3.0], num_replicas=2, num_workers=1)
  assert line == ("all-reduce over 2 replica(s): sum of (replica index + 1) "
                  "= 3 on every local replica")
  assert "on 2 workers" in checks.check_all_reduce(
      [3.0], num_replicas=2, num_workers=2)


def test_a_wrong_sum_fails_naming_the_replica_and_both_values():
  # Each replica keeping its own value (no all-reduce at all).
  with pytest.raises(checks.CheckFailed) as failed:
    checks.check_all_reduce([1.0, 2.0], num_replicas=2, num_workers=1)
  assert str(failed.value) == (
      "the all-reduce over 2 replica(s) summed (replica index + 1) to 1 on "
      "local replica 0, 2 on local replica 1, expected 3")
  # The sum of this worker's replicas only, on one of 2 workers.
  with pytest.raises(checks.CheckFailed, match="to 1 on local replica 0, "
                     "expected 3"):
    checks.check_all_reduce([1.0], num_replicas=2, num_workers=2)
  with pytest.raises(checks.CheckFailed, match="to nothing"):
    checks.check_all_reduce([], num_replicas=1, num_workers=1)


def test_the_peer_an_error_names():
  me = Task("worker 0", "h:1")
  peers = [Task("worker 1", "h:2"), Task("chief 0", "h:3")]
  message = ("UnavailableError: Task /job:worker/replica:0/task:0 saw "
             "/job:worker/replica:0/task:1 miss its heartbeats")
  assert checks.failed_peer(message, me, peers) == peers[0]
  assert checks.failed_peer("/job:chief/replica:0/task:0 left", me,
                            peers) == peers[1]
  assert checks.failed_peer("Error reported from /job:worker/task:1", me,
                            peers) == peers[0]
  assert checks.failed_peer("/job:worker/replica:0/task:0 only", me,
                            peers) is None
  assert checks.failed_peer("no task", me, peers) is None


# The command line.


def _main(capsys, *flags):
  code = cli.main(["doctor", *flags])
  return code, capsys.readouterr().err


def test_a_bad_flag_is_one_line_and_exit_1(capsys):
  code, err = _main(capsys, "--timeout_s=0")
  assert (code, err) == (1, "dist_train doctor: error: --timeout_s must be "
                            "positive, got 0\n")
  code, err = _main(capsys, "--timeout_z=3")
  assert code == 1
  assert err.startswith("dist_train doctor: error: Unknown command line flag "
                        "'timeout_z'")
  code, err = _main(capsys, "--cpu_replicas=0")
  assert code == 1 and "cpu_replicas" in err.splitlines()[0]
  code, err = _main(capsys, "extra")
  assert code == 1 and "unexpected arguments ['extra']" in err


def test_the_flags_share_the_training_runs_help():
  assert cli.FLAGS["cpu_replicas"].help == (
      cli.config_lib.Config.__dataclass_fields__["cpu_replicas"]
      .metadata["help"])
  assert cli.FLAGS["timeout_s"].default == 60.0


# The rendezvous.


def _meet_all(tasks, timeout_s):
  """meet() of every task, each in a thread: {name: None or the error}."""
  outcome = {}

  def meet(task):
    try:
      rendezvous.meet(me=task, peers=[t for t in tasks if t != task],
                      timeout_s=timeout_s)
      outcome[task.name] = None
    except rendezvous.RendezvousError as e:
      outcome[task.name] = str(e)

  threads = [threading.Thread(target=meet, args=(task,)) for task in tasks]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  return outcome


def test_three_workers_meet_and_free_their_ports():
  tasks = [Task(f"worker {i}", f"127.0.0.1:{port}")
           for i, port in enumerate(workers.free_ports(3))]
  assert _meet_all(tasks, timeout_s=20) == {t.name: None for t in tasks}
  for task in tasks:  # TensorFlow binds these next.
    with socket.socket() as s:
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      s.bind(("127.0.0.1", task.port))


def test_a_dead_peer_fails_within_the_timeout_naming_it():
  mine, dead = workers.free_ports(2)
  start = time.monotonic()
  with pytest.raises(rendezvous.RendezvousError) as failed:
    rendezvous.meet(me=Task("worker 0", f"127.0.0.1:{mine}"),
                    peers=[Task("worker 1", f"127.0.0.1:{dead}")],
                    timeout_s=1.0)
  assert time.monotonic() - start < 3.0
  assert str(failed.value) == (
      f"worker 1 (127.0.0.1:{dead}) did not join the all-reduce within 1 s "
      "(nothing listens at that address: is its process running?)")


def _serve(port, reply, stop):
  """A listener on `port` that answers every connection with `reply`."""
  with socket.socket() as server:
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(8)
    server.settimeout(0.1)
    while not stop.is_set():
      try:
        conn, _ = server.accept()
      except socket.timeout:
        continue
      with conn:
        conn.recv(256)
        conn.sendall(reply)


@pytest.mark.parametrize("reply,why", [
    (b"SSH-2.0-OpenSSH\n", "something answers at that address, but not the "
     "doctor"),
    # A doctor that answers but cannot connect back.
    (rendezvous.ANSWER, "it answers, but did not reach this worker 0 "),
])
def test_a_peer_that_is_not_a_doctor_or_cannot_reach_back_fails(reply, why):
  mine, other = workers.free_ports(2)
  stop = threading.Event()
  server = threading.Thread(target=_serve, args=(other, reply, stop))
  server.start()
  try:
    with pytest.raises(rendezvous.RendezvousError) as failed:
      rendezvous.meet(me=Task("worker 0", f"127.0.0.1:{mine}"),
                      peers=[Task("worker 1", f"127.0.0.1:{other}")],
                      timeout_s=1.0)
  finally:
    stop.set()
    server.join()
  assert str(failed.value).startswith(
      f"worker 1 (127.0.0.1:{other}) did not join the all-reduce within 1 s")
  assert why in str(failed.value)


def test_the_parts_load_without_tensorflow():
  result = processes.run_python(
      ["-c", "import sys; from dist_train.doctor import cli, checks, "
       "deadline, rendezvous, report; print('tensorflow' in sys.modules)"],
      check=True, prewarmed=False)
  assert result.stdout == "False\n"
