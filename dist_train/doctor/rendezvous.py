"""The doctor's check that every worker of the cluster is up and reachable,
before TensorFlow joins them.

TensorFlow's join (the MultiWorkerMirroredStrategy constructor) waits for
every worker while holding Python's lock, so no thread of the process can
time it out (distribute/join_guard.py). The doctor meets its peers first,
over plain TCP on the ports of the cluster spec: each worker listens on its
own port and connects to every peer's, until it has reached every peer and
every peer has reached it, or `timeout_s` passes. A worker keeps listening
until every peer has reached it, so none is left waiting for one that moved
on. The listener is closed before TensorFlow binds the same port (the
connecting side closes first, so no connection lingers on it).

No TensorFlow here.
"""

import dataclasses
import socket
import threading
import time
from typing import Optional, Sequence

HELLO = b"dist_train doctor "  # + the task's name, e.g. "worker 1", + "\n".
ANSWER = b"ok\n"
_RETRY_S = 0.1
_IO_TIMEOUT_S = 2.0


@dataclasses.dataclass(frozen=True)
class Task:
  """One task of the cluster: its name ("worker 1") and host:port."""

  name: str
  address: str

  @property
  def host(self) -> str:
    return self.address.rsplit(":", 1)[0].strip("[]")

  @property
  def port(self) -> int:
    return int(self.address.rsplit(":", 1)[1])

  def __str__(self):
    return f"{self.name} ({self.address})"


class RendezvousError(Exception):
  """A peer was not reached, or did not reach this task, in time."""


def _read_line(conn: socket.socket, deadline: float) -> bytes:
  data = b""
  while not data.endswith(b"\n") and len(data) < 256:
    conn.settimeout(max(0.01, min(_IO_TIMEOUT_S, deadline - time.monotonic())))
    chunk = conn.recv(256)
    if not chunk:
      break
    data += chunk
  return data


class _Listener:
  """Accepts the peers' hellos on this task's port, in a thread."""

  def __init__(self, port: int, expected: Sequence[str]):
    self.reached_by = set()
    self._expected = set(expected)
    self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # TensorFlow's server binds this port next.
    self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    self._sock.bind(("", port))
    self._sock.listen(64)
    self._sock.settimeout(_RETRY_S)
    self._stopped = threading.Event()
    self._thread = threading.Thread(target=self._serve, daemon=True,
                                    name="dist_train_doctor_rendezvous")
    self._thread.start()

  def _serve(self):
    while not self._stopped.is_set():
      try:
        conn, _ = self._sock.accept()
      except (socket.timeout, OSError):
        continue
      with conn:
        try:
          line = _read_line(conn, time.monotonic() + _IO_TIMEOUT_S)
          name = line[len(HELLO):].decode(errors="replace").strip()
          if not line.startswith(HELLO) or name not in self._expected:
            continue
          conn.sendall(ANSWER)
          # Wait for the peer to close first: the lingering end of the
          # connection is then on its side, not on this task's port.
          conn.settimeout(_IO_TIMEOUT_S)
          conn.recv(1)
        except OSError:
          continue
        self.reached_by.add(name)

  def close(self):
    self._stopped.set()
    self._thread.join()
    self._sock.close()


def _hello(peer: Task, me: Task, deadline: float) -> Optional[str]:
  """Greets `peer` once; None when it answered, else why not."""
  try:
    with socket.create_connection(
        (peer.host, peer.port),
        timeout=max(0.01, min(_IO_TIMEOUT_S,
                              deadline - time.monotonic()))) as conn:
      conn.sendall(HELLO + me.name.encode() + b"\n")
      if _read_line(conn, deadline) == ANSWER:
        return None
      return "something answers at that address, but not the doctor"
  except ConnectionRefusedError:
    return "nothing listens at that address"
  except socket.gaierror as e:
    return f"its host name does not resolve ({e.strerror})"
  except OSError as e:
    return f"it cannot be reached ({e.strerror or type(e).__name__})"


def meet(*, me: Task, peers: Sequence[Task], timeout_s: float) -> None:
  """Returns once every peer and this task have reached each other.

  Raises:
    RendezvousError: within `timeout_s`, a peer did not answer, or did not
      reach this task; the message names the first such peer, its address
      and why.
    OSError: this task's port cannot be listened on.
  """
  deadline = time.monotonic() + timeout_s
  listener = _Listener(me.port, [peer.name for peer in peers])
  try:
    why = {peer.name: "nothing answered yet" for peer in peers}
    while time.monotonic() < deadline:
      for peer in peers:
        if why.get(peer.name) is not None:
          why[peer.name] = _hello(peer, me, deadline)
      if all(reason is None for reason in why.values()) and (
          listener.reached_by >= set(why)):
        return
      time.sleep(_RETRY_S)
    for peer in peers:
      if why[peer.name] is not None:
        raise RendezvousError(
            f"{peer} did not join the all-reduce within {timeout_s:g} s "
            f"({why[peer.name]}: is its process running?)")
    for peer in peers:
      if peer.name not in listener.reached_by:
        raise RendezvousError(
            f"{peer} did not join the all-reduce within {timeout_s:g} s "
            f"(it answers, but did not reach this {me} back: can it "
            f"connect to {me.address}?)")
  finally:
    listener.close()
