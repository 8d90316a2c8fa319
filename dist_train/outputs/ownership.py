"""One run owns a model_dir: a lock record that does not outlive its owner.

Two runs on one --model_dir (a double submit, a requeued job whose old copy
still runs) would interleave their checkpoints. The chief takes ownership
before it writes anything; a second run is refused with one line naming the
holder, and the first carries on.

The claim is the file <model_dir>/OWNER.lock, one JSON record:

    {"host": "h1", "pid": 1234, "pid_start_time": 98765,
     "pid_ns": "pid:[4026531836]", "boot_id": "4f02f9de-...",
     "lease_s": 60.0, "started": 1795000000.0, "renewed": 1795000042.0,
     "token": "<uuid4>"}

model_dir is often on NFS, where flock and fcntl locks are unreliable, so the
claim uses none; it rests on link(2) and rename(2), which are atomic there too.

- Create: the record is written and fsynced under a unique temporary name,
  then hard-linked to OWNER.lock. link fails if the name exists, so of two
  runs exactly one creates it, and no reader ever sees a half-written record.
  On NFS a retransmitted link can fail after it succeeded; the temporary
  file's link count says which (the recipe of open(2)).
- Renew: every lease_s / 3 seconds a daemon thread checks that the token is
  still ours, writes a new record under a temporary name and os.replace()s it.
- Stale: a holder on this machine (same host name and boot id, in a PID
  namespace we can see) is judged exactly: it is dead if its pid is gone or a
  zombie, or if the pid now belongs to a process started at another time
  (field 22 of /proc/<pid>/stat). Another boot id means the host rebooted. A
  holder we cannot see is judged by its lease: a record not renewed for the
  holder's lease_s is stale. This assumes host names are unique among the
  machines sharing the directory, and clocks that agree to well under lease_s.
- Take over: the stale file is renamed to a unique name (of two contenders
  renaming it, one succeeds), re-read and compared with the record judged
  stale. If it differs, the contender moved a fresh record (another
  contender's, or a renewal that came in between): it links it back if the
  name is still free and looks again. If it is the same, it deletes it and
  creates its own with link, which again only one contender wins. release()
  moves and compares the same way, so it never deletes another run's record.
- Lost: renewal and check() read the token. A holder that finds another
  token, or no record, was taken over (it stalled for longer than its lease)
  or cleaned up by hand, and must stop writing.

Not POSIX: on a model_dir on another TensorFlow filesystem (gs://, hdfs://,
ram://) there is no link(2) to rely on, so no lock is taken: the run logs a
warning and carries on, and a second run on the same model_dir is not
detected.

What is left: with three or more contenders, a record moved aside can find its
name taken before it is put back, and a renewal delayed past the lease can
overwrite the record of the run that took over; either way the run that lost
its record learns it at its next check().
"""

import contextlib
import json
import os
import socket
import threading
import time
import uuid

from absl import logging

from dist_train import errors
from dist_train.outputs import model_dir as model_dir_lib

LOCK_FILE_NAME = model_dir_lib.OWNER_LOCK
# The fields every record has; records may carry more (pid_ns, lease_s).
_FIELDS = ("host", "pid", "pid_start_time", "boot_id", "started", "renewed",
           "token")
# How often acquire() looks again when the record changes under it (a holder
# released, another contender took over) before it gives up.
_MAX_ATTEMPTS = 10
# The "record" held on a model_dir that is not POSIX, where no lock is taken.
_NOT_LOCKED = {}


class ModelDirInUseError(errors.DistTrainError):
  """Another live run owns the model_dir."""


class ModelDirLostError(errors.DistTrainError):
  """This run's claim on its model_dir was taken over or removed."""


class ModelDirNotWritableError(errors.DistTrainError):
  """The model_dir or its lock record cannot be created, written or read."""


def describe_holder(record: dict, *, now: float | None = None) -> str:
  """Names the run a lock record belongs to, for one-line messages.

  Args:
    record: a record as read from the lock file (see the module docstring).
    now: the current time in epoch seconds; time.time() when None.

  Returns:
    E.g. "the run with pid 1234 on host h1 since 2026-11-27 13:05:02 (lease
    renewed 3s ago)", the start in local time.
  """
  now = time.time() if now is None else now
  age = max(0.0, now - record["renewed"])
  if "unreadable" in record:
    return (f"an unreadable lock record ({record['unreadable']}) last written "
            f"{age:.0f}s ago")
  started = time.strftime("%Y-%m-%d %H:%M:%S",
                          time.localtime(record["started"]))
  return (f"the run with pid {record['pid']} on host {record['host']} since "
          f"{started} (lease renewed {age:.0f}s ago)")


def _read_text(path: str) -> str | None:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return None


def _boot_id() -> str | None:
  return _read_text("/proc/sys/kernel/random/boot_id")


def _pid_namespace() -> str | None:
  try:
    return os.readlink("/proc/self/ns/pid")
  except OSError:
    return None


def _process_start_time(pid: int) -> int | None:
  """Field 22 of /proc/<pid>/stat (clock ticks after boot), or None.

  None when the process is gone, is a zombie, or /proc cannot say.
  """
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      stat = f.read()
  except OSError:
    return None
  # Field 2, the command name in parentheses, may itself hold ") ".
  fields = stat[stat.rindex(b")") + 2:].split()
  if fields[0] in (b"Z", b"X"):  # Killed but not yet reaped: dead to us.
    return None
  return int(fields[19])


def _stale_reason(record: dict, now: float, lease_s: float) -> str | None:
  """Why the holder of `record` is gone, or None while it may be alive.

  `lease_s` applies to records that do not say their own.
  """
  host = socket.gethostname()
  if record.get("host") == host:
    boot_id = _boot_id()
    if boot_id and record["boot_id"] and record["boot_id"] != boot_id:
      return f"host {host} rebooted since"
    sees_pids = _process_start_time(os.getpid()) is not None
    if sees_pids and record.get("pid_ns", _pid_namespace()) == _pid_namespace():
      pid, start = record["pid"], _process_start_time(record["pid"])
      if start is None:
        return f"pid {pid} is no longer running"
      if record["pid_start_time"] is not None and (
          start != record["pid_start_time"]):
        return f"pid {pid} now belongs to another process"
      return None
  lease_s = record.get("lease_s", lease_s)
  age = now - record["renewed"]
  if age > lease_s:
    return f"its lease was last renewed {age:.0f}s ago, over its {lease_s:g}s"
  return None


def _read_record(path: str) -> dict | None:
  """The record at `path`, or None if there is none.

  Records appear whole (by link or rename), so a file that is not one was not
  written by a run of ours; it comes back as {"unreadable": why, "renewed":
  its mtime} and goes stale like a lease instead of blocking the dir for good.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
      mtime = os.fstat(f.fileno()).st_mtime
  except FileNotFoundError:
    return None
  try:
    record = json.loads(data)
    if not isinstance(record, dict):
      raise ValueError("not a JSON object")
    missing = [field for field in _FIELDS if field not in record]
    if missing:
      raise ValueError(f"no {missing[0]!r}")
  except ValueError as e:  # JSON and UTF-8 decoding errors among them.
    return {"unreadable": errors.first_line(e), "renewed": mtime}
  return record


def _write_temp(path: str, record: dict) -> str:
  """Writes `record` to a new file next to `path`; returns the file's name."""
  temp = f"{path}.{uuid.uuid4().hex}.tmp"
  try:
    with open(temp, "x") as f:
      json.dump(record, f)
      f.flush()
      # Durable before it takes the lock's name: after a crash the name holds
      # the old record or the new one, never an empty file.
      os.fsync(f.fileno())
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(temp)
    raise
  return temp


def _link_new(path: str, record: dict) -> bool:
  """Creates `path` holding `record`; False if `path` exists already."""
  temp = _write_temp(path, record)
  try:
    os.link(temp, path)
    return True
  except OSError as e:
    # A retransmitted NFS link can fail after the first one succeeded.
    if os.stat(temp).st_nlink == 2:
      return True
    if isinstance(e, FileExistsError):
      return False
    raise
  finally:
    os.unlink(temp)


def _replace(path: str, record: dict) -> None:
  temp = _write_temp(path, record)
  try:
    os.replace(temp, path)
  except BaseException:
    os.unlink(temp)
    raise


def _remove_if_unchanged(path: str, expected: dict) -> bool:
  """Removes the record at `path` if it is `expected`; True if it did.

  Any other record is put back, unless a new one has taken the name already.
  """
  aside = f"{path}.{uuid.uuid4().hex}.aside"
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return False  # Gone already: removed or moved by another run.
  try:
    if _read_record(aside) == expected:
      return True
    with contextlib.suppress(FileExistsError):
      os.link(aside, path)
    return False
  finally:
    os.unlink(aside)


def _not_writable(model_dir: str, path: str, error: OSError, *,
                  doing: str = "hold ownership of") -> ModelDirNotWritableError:
  return ModelDirNotWritableError(
      f"cannot {doing} --model_dir={model_dir}: "
      f"{error.filename or path}: {error.strerror or error}")


class ModelDirOwnership:
  """A run's claim on its model_dir, held from acquire() to release().

  The chief wraps everything it writes, and asks at loop boundaries:

      with ownership.ModelDirOwnership(model_dir) as owner:
        ...
        owner.check()
  """

  def __init__(self, model_dir: str, *, lease_s: float = 60.0,
               clock=time.time):
    """Prepares a claim; nothing is written before acquire().

    Args:
      model_dir: the directory to own; acquire() creates it if missing.
      lease_s: seconds without renewal after which runs that cannot see this
        process (other hosts) may judge the claim stale. It is renewed every
        lease_s / 3 seconds.
      clock: returns the time in epoch seconds.

    Raises:
      ValueError: lease_s is not positive.
    """
    if not lease_s > 0:
      raise ValueError(f"lease_s must be positive, got {lease_s}")
    self._model_dir = model_dir
    self._lease_s = lease_s
    self._clock = clock
    self._path = model_dir_lib.owner_lock_file(model_dir)
    self._locks = model_dir_lib.is_local(model_dir)
    self._record = None  # While held: the record last written.
    self._renew_error = None  # The OSError of the last renewal, if it failed.
    self._stop = threading.Event()
    self._renewer = None

  @property
  def model_dir(self) -> str:
    return self._model_dir

  @property
  def lease_s(self) -> float:
    return self._lease_s

  @property
  def holder(self) -> dict | None:
    """The record of the run holding model_dir (perhaps this one), or None."""
    if not self._locks:
      return None
    try:
      return _read_record(self._path)
    except OSError as e:
      raise _not_writable(self.model_dir, self._path, e) from e

  def acquire(self) -> None:
    """Claims model_dir for this run, taking over a stale claim.

    Raises:
      ModelDirInUseError: a live run holds model_dir.
      ModelDirNotWritableError: model_dir or its lock record cannot be
        created, written or read.
      RuntimeError: this object holds model_dir already.
    """
    if self._record is not None:
      raise RuntimeError(f"--model_dir={self.model_dir} is already held by "
                         "this ModelDirOwnership")
    if not self._locks:
      logging.warning(
          "--model_dir=%s is not on a POSIX filesystem: no %s is taken, so "
          "a second run on it would not be detected; start only one",
          self.model_dir, LOCK_FILE_NAME)
      self._record = _NOT_LOCKED
      return
    try:
      os.makedirs(self.model_dir, exist_ok=True)
      self._record = self._claim()
    except OSError as e:
      raise _not_writable(self.model_dir, self._path, e) from e
    self._renew_error = None
    self._stop.clear()
    self._renewer = threading.Thread(
        target=self._renew_until_stopped, daemon=True,
        name=f"renew {self._path}")
    self._renewer.start()

  def _claim(self) -> dict:
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "pid_start_time": _process_start_time(os.getpid()),
              "pid_ns": _pid_namespace(), "boot_id": _boot_id(),
              "lease_s": self.lease_s, "started": self._clock(),
              "token": str(uuid.uuid4())}
    for _ in range(_MAX_ATTEMPTS):
      record["renewed"] = self._clock()
      if _link_new(self._path, record):
        return record
      holder = _read_record(self._path)
      if holder is None:
        continue  # Released in between.
      now = self._clock()
      reason = _stale_reason(holder, now, self.lease_s)
      if reason is None:
        raise ModelDirInUseError(
            f"--model_dir={self.model_dir} is in use by "
            f"{describe_holder(holder, now=now)}; stop that run or use "
            "another --model_dir")
      if _remove_if_unchanged(self._path, holder):
        logging.warning("Removed the stale claim on --model_dir=%s of %s: %s",
                        self.model_dir, describe_holder(holder, now=now),
                        reason)
    raise ModelDirInUseError(
        f"--model_dir={self.model_dir}: {LOCK_FILE_NAME} changed hands "
        f"{_MAX_ATTEMPTS} times while this run tried to take it; other runs "
        "are starting on it")

  def _renew_until_stopped(self) -> None:
    while not self._stop.wait(self.lease_s / 3):
      try:
        current = _read_record(self._path)
        if current is None or current.get("token") != self._record["token"]:
          return  # Lost: check() says so; renewing would take it back.
        record = dict(self._record, renewed=self._clock())
        _replace(self._path, record)
        self._record = record
        self._renew_error = None
      except OSError as e:
        # Perhaps a passing NFS hiccup: try again at the next renewal; check()
        # reports it once the lease may have run out.
        self._renew_error = e

  def check(self) -> None:
    """Raises unless this run still owns model_dir; one small read.

    Raises:
      ModelDirLostError: the record names another run, or is gone, or could
        not be renewed for longer than the lease.
      ModelDirNotWritableError: the record cannot be read.
      RuntimeError: acquire() has not succeeded.
    """
    if self._record is None:
      raise RuntimeError(f"check() on --model_dir={self.model_dir} before "
                         "acquire()")
    if self._record is _NOT_LOCKED:
      return
    current = self.holder
    if current is None:
      raise ModelDirLostError(
          f"lost --model_dir={self.model_dir}: its lock record {self._path} "
          "was removed while this run held it; stopping so that two runs "
          "never write there at once")
    now = self._clock()
    if current.get("token") != self._record["token"]:
      raise ModelDirLostError(
          f"lost --model_dir={self.model_dir}: it is now held by "
          f"{describe_holder(current, now=now)}; stopping so that two runs "
          "never write there at once")
    error, age = self._renew_error, now - self._record["renewed"]
    if error is not None and age > self.lease_s:
      raise ModelDirLostError(
          f"lost --model_dir={self.model_dir}: its lock record {self._path} "
          f"was last renewed {age:.0f}s ago, over the {self.lease_s:g}s lease "
          f"({error.strerror or error}); another run may take it over")

  def release(self) -> None:
    """Gives model_dir up; does nothing if it is not held.

    Removes the lock record only if it is still this run's.

    Raises:
      ModelDirNotWritableError: the record cannot be removed.
    """
    if self._record is None:
      return
    if self._record is _NOT_LOCKED:
      self._record = None
      return
    self._stop.set()
    self._renewer.join()
    record, self._record = self._record, None
    try:
      _remove_if_unchanged(self._path, record)
    except OSError as e:
      raise _not_writable(self.model_dir, self._path, e) from e

  def __enter__(self) -> "ModelDirOwnership":
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> bool:
    self.release()
    return False


def check_writable(model_dir: str) -> None:
  """Creates model_dir if needed and proves a file can be written in it.

  Run before TensorFlow starts, so that a model_dir that cannot be created
  (no such parent, a parent that is a file, a read-only filesystem, no
  permission) stops the run in well under a second.

  A model_dir on another TensorFlow filesystem (gs://) is not probed: its
  first write reports what is wrong.

  Raises:
    ModelDirNotWritableError: naming the path and the operating system's
      reason.
  """
  if not model_dir_lib.is_local(model_dir):
    return
  probe = os.path.join(model_dir, f".write_probe.{socket.gethostname()}."
                       f"{os.getpid()}")
  path = model_dir
  try:
    os.makedirs(model_dir, exist_ok=True)
    path = probe
    with open(probe, "w") as f:
      f.write("dist_train")
    os.remove(probe)
  except OSError as e:
    in_the_way = (_file_in_the_way(model_dir)
                  if isinstance(e, NotADirectoryError) else None)
    if in_the_way:
      raise ModelDirNotWritableError(
          f"cannot create --model_dir={model_dir}: {in_the_way} is a file, "
          "not a directory") from e
    raise _not_writable(model_dir, path, e, doing="write to") from e


def _file_in_the_way(path: str) -> str | None:
  """The nearest existing ancestor of `path` if it is not a directory."""
  path = os.path.abspath(path)
  while os.path.dirname(path) != path:
    path = os.path.dirname(path)
    if os.path.lexists(path):
      return None if os.path.isdir(path) else path
  return None
