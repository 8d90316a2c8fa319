"""`dist-train doctor`: flags -> report -> smoke test -> exit code.

The doctor has flags of its own (a `FlagValues` of this module, not absl's
global one), so `dist-train doctor` and `python -m dist_train.main doctor`
run it in the same process as `python -m dist_train.main` would start,
whose training flags are already defined. See dist_train/doctor/__init__.py
for how to run it.
"""

import contextlib
import os
import sys
import time
import traceback
from typing import Optional

from absl import flags

from dist_train import compat
from dist_train import config as config_lib
from dist_train import errors
from dist_train import logs
from dist_train.distribute import cluster as cluster_lib
from dist_train.doctor import checks
from dist_train.doctor import deadline as deadline_lib
from dist_train.doctor import rendezvous
from dist_train.doctor import report

FLAGS = flags.FlagValues()
_CONFIG_FIELDS = config_lib.Config.__dataclass_fields__


def _help(name: str) -> str:
  """The help of the training flag of the same name (config.Config)."""
  return _CONFIG_FIELDS[name].metadata["help"]


_TIMEOUT_S = flags.DEFINE_float(
    "timeout_s", 60.0,
    "Each step of the smoke test that waits (every worker reaching the "
    "others, the all-reduce, the checkpoint) must end within this many "
    "seconds, or the doctor fails naming what did not.", flag_values=FLAGS)
_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None,
    "Also write a test checkpoint here, read it back and remove it (any "
    "tf.io.gfile path: a folder, gs://, ram://).", flag_values=FLAGS)
_CPU_REPLICAS = flags.DEFINE_integer(
    "cpu_replicas", None, _help("cpu_replicas"), lower_bound=1,
    flag_values=FLAGS)
_NUM_GPUS = flags.DEFINE_integer(
    "num_gpus", None, _help("num_gpus"), lower_bound=0, flag_values=FLAGS)
_CLUSTER = flags.DEFINE_enum(
    "cluster", "auto", list(config_lib.CLUSTERS), _help("cluster"),
    flag_values=FLAGS)
_COLLECTIVE = flags.DEFINE_enum(
    "collective", "auto", list(config_lib.COLLECTIVES), _help("collective"),
    flag_values=FLAGS)
_SLURM_PORT_BASE = flags.DEFINE_integer(
    "slurm_port_base", 8888, _help("slurm_port_base"), lower_bound=1,
    flag_values=FLAGS)
_TRACEBACK = flags.DEFINE_bool(
    "traceback", False,
    "On failure, print the Python traceback before the one-line error.",
    flag_values=FLAGS)

_USAGE = ("usage: dist-train doctor [--timeout_s=S] [--model_dir=DIR] "
          "[--cpu_replicas=N] [flags]; --helpfull lists them")


def _section(title: str, lines) -> None:
  print(title)
  for text in lines:
    print(text)
  sys.stdout.flush()


def _passed(text: str) -> None:
  print(f"  ok  {text}", flush=True)


def _cluster_tasks(resolved, strategy_lib):
  """(this task, its peers) of the cluster, as the strategy will see it:
  the same resolver (TF_CONFIG, or SLURM's host names and ports)."""
  if resolved.cluster is None:
    return None, []
  resolver = strategy_lib.create_cluster_resolver(
      resolved, _SLURM_PORT_BASE.value)
  return report.cluster_tasks(resolver.cluster_spec().as_dict(),
                              resolver.task_type, resolver.task_id)


def _op_error_line(error, what, me, peers) -> str:
  text = errors.summary(error)
  peer = checks.failed_peer(str(error), me, peers) if me else None
  if peer is not None:
    return f"{peer} failed during {what}: {text}"
  return f"{what} failed: {text}"


def _leave_together(me, peers, timeout_s):
  """Returns when this worker may exit without failing a peer.

  A worker that exits as soon as its own all-reduce ended may still be read
  from by a peer's (TensorFlow's exit does not wait for the peers), so every
  worker first waits for all at the coordination service's barrier. The
  task that runs the service (the chief, else worker 0) leaves last: a peer
  still waiting for the barrier's answer would lose it with the service.
  """
  addresses = [str(peer) for peer in peers]
  with deadline_lib.watched_from_outside(
      timeout_s=timeout_s, peers=addresses,
      message=f"{{peer}} did not finish its checks within {timeout_s:g} s "
      "of this worker"):
    try:
      compat.wait_at_barrier("dist_train_doctor_done", timeout_s)
    except Exception as e:  # pylint: disable=broad-except
      deadline_lib.fail(_op_error_line(e, "the closing barrier", me, peers))
  tasks = sorted([me, *peers], key=lambda task: task.name)  # chief first.
  if tasks[0] == me:
    end = time.monotonic() + timeout_s
    while (time.monotonic() < end and
           len(deadline_lib.unreachable([p.address for p in peers])) <
           len(peers)):
      time.sleep(0.05)
  # Nor may TensorFlow's threads hold the exit for ever.
  deadline_lib.watch_exit(
      timeout_s=timeout_s, message=f"this {me} did not exit within "
      f"{timeout_s:g} s of its checks (TensorFlow held it)")


def _join(resolved, strategy_lib, me, peers, timeout_s):
  """The strategy, once every peer answered (the rendezvous) and TensorFlow
  joined them; ends the process with the line naming a peer that did not."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  if peers:
    try:
      rendezvous.meet(me=me, peers=peers, timeout_s=timeout_s)
    except OSError as e:
      deadline_lib.fail(f"this {me} cannot listen on port {me.port} of its "
                        f"address {me.address}: {e.strerror or e}")
    except rendezvous.RendezvousError as e:
      deadline_lib.fail(str(e))
    _passed(f"every peer reached: {', '.join(str(p) for p in peers)}")
  # TensorFlow's join holds Python's lock: a process of its own watches it.
  join_watch = deadline_lib.watched_from_outside(
      timeout_s=timeout_s, peers=[str(peer) for peer in peers],
      message=f"{{peer}} did not join the all-reduce within {timeout_s:g} s "
      "(it answered the rendezvous, then TensorFlow's join waited for it: "
      "did its process die?)") if peers else contextlib.nullcontext()
  try:
    with join_watch:
      return strategy_lib.create_strategy(
          resolved, num_gpus=_NUM_GPUS.value,
          cpu_replicas=_CPU_REPLICAS.value, collective=_COLLECTIVE.value,
          collective_timeout_s=timeout_s,
          slurm_port_base=_SLURM_PORT_BASE.value)
  except tf.errors.OpError as e:
    deadline_lib.fail(_op_error_line(e, "joining the cluster", me, peers))
    raise  # Not reached: fail ends the process.


def diagnose() -> int:
  """Prints the report, runs the smoke test; returns the exit code (or ends
  the process with `deadline.fail` when a step is late)."""
  timeout_s = _TIMEOUT_S.value
  print("dist_train doctor", flush=True)
  resolved = cluster_lib.resolve(
      strategy="auto", cluster=_CLUSTER.value,
      cpu_replicas=_CPU_REPLICAS.value, environ=os.environ)
  logs.quiet_tensorflow_startup()
  with logs.startup_info_hidden():
    # pylint: disable=import-outside-toplevel
    import tensorflow as tf
    from dist_train.distribute import strategy as strategy_lib
  logs.configure_logging(verbose=_TRACEBACK.value)
  _section("versions", report.format_versions(report.collect_versions()))
  _section("built with", report.format_build_info(
      tf.sysconfig.get_build_info()))
  me, peers = _cluster_tasks(resolved, strategy_lib)
  _section("cluster", report.format_cluster(resolved.cluster, me, peers))

  watch = deadline_lib.Deadline(timeout_s=timeout_s)
  strategy = _join(resolved, strategy_lib, me, peers, timeout_s)
  num_workers = strategy_lib.num_workers(strategy)
  _section("devices", report.format_devices(
      report.collect_devices(me if peers else None),
      list(strategy.extended.worker_devices)))
  print("checks", flush=True)

  def late():
    return checks.late_all_reduce_message(
        timeout_s=timeout_s, num_workers=num_workers, peers=peers)

  try:
    with watch.guard(late):
      results = checks.all_reduce(strategy)
  except tf.errors.OpError as e:
    deadline_lib.fail(_op_error_line(e, "the all-reduce", me, peers))
  _passed(checks.check_all_reduce(
      results, num_replicas=strategy.num_replicas_in_sync,
      num_workers=num_workers))

  failed = None
  if _MODEL_DIR.value:
    with watch.guard(lambda: f"the test checkpoint in --model_dir="
                     f"{_MODEL_DIR.value} took more than {timeout_s:g} s"):
      try:
        _passed(checks.check_checkpoint(
            _MODEL_DIR.value, me.name if me else "local"))
      except checks.CheckFailed as e:
        failed = str(e)
  if num_workers > 1:
    _leave_together(me, peers, timeout_s)
  if failed:
    raise checks.CheckFailed(failed)
  print("dist_train doctor: every check passed", flush=True)
  return 0


def main(argv) -> int:
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    print(f"{deadline_lib.PREFIX}{errors.first_line(e)}\n{_USAGE}",
          file=sys.stderr)
    return deadline_lib.EXIT_FAILED
  if len(rest) > 1:
    print(f"{deadline_lib.PREFIX}unexpected arguments {rest[1:]}\n{_USAGE}",
          file=sys.stderr)
    return deadline_lib.EXIT_FAILED
  if _TIMEOUT_S.value <= 0:
    print(f"{deadline_lib.PREFIX}--timeout_s must be positive, got "
          f"{_TIMEOUT_S.value:g}", file=sys.stderr)
    return deadline_lib.EXIT_FAILED
  try:
    return diagnose()
  except (errors.DistTrainError, checks.CheckFailed) as e:
    message = str(e)
  except Exception as e:  # pylint: disable=broad-except
    message = errors.summary(e)
  if _TRACEBACK.value:
    traceback.print_exc()
  deadline_lib.fail(message)
  return deadline_lib.EXIT_FAILED  # Not reached: fail ends the process.


def run_cli(argv: Optional[list] = None) -> None:
  """`dist-train doctor`, `python -m dist_train.doctor`."""
  argv = list(sys.argv if argv is None else argv)
  if any(arg in ("--help", "-h", "--helpfull", "-?") for arg in argv[1:]):
    print(f"{_USAGE}\n\n{FLAGS.get_help()}")
    return
  # absl's own flags stay unparsed: say so, or absl logs a notice first.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  sys.exit(main(argv))
