"""The prewarmed server (tests/helpers/prewarmed.py) forks runs that behave
as `python` would: they exit the same way, and what it learns from one run
(AutoGraph's conversions) reaches the next."""

from tests.helpers import processes

# Buffered output, a non-daemon thread that prints after the main thread
# ended, an atexit handler, and an exit code.
_EXITING = """
import atexit, sys, threading, time
atexit.register(lambda: print("atexit ran"))
def late():
  time.sleep(0.3)
  print("thread joined")
threading.Thread(target=late).start()
sys.stdout.write("buffered, no newline ")
sys.exit(3)
"""


def test_a_forked_run_exits_as_a_fresh_python_does():
  forked = processes.run_python(["-c", _EXITING], prewarmed=True)
  fresh = processes.run_python(["-c", _EXITING], prewarmed=False)
  assert fresh.returncode == 3
  assert fresh.stdout == "buffered, no newline thread joined\natexit ran\n"
  assert (forked.returncode, forked.stdout) == (fresh.returncode, fresh.stdout)


# Whether AutoGraph's cache holds dist_train.loop.metrics.float32 before the
# run converts it, and after. (A function of -c code has no source to
# convert, so the step is the library function itself.)
_CONVERTING = """
import tensorflow as tf
from tensorflow.python.autograph.impl import api
from dist_train.loop import metrics

def cached():
  return bool(api._TRANSPILER._cache._cache.get(metrics.float32.__code__))

before = cached()
tf.function(metrics.float32)(tf.constant(1.0))
print(before, cached())
"""


def test_a_function_one_run_converted_is_converted_for_the_next():
  first = processes.run_python(["-c", _CONVERTING], prewarmed=True,
                               check=True)
  assert first.stdout.split()[1] == "True", first.stdout
  second = processes.run_python(["-c", _CONVERTING], prewarmed=True,
                                check=True)
  assert second.stdout.split() == ["True", "True"], second.stdout
