"""Training throughput between log lines, leaving out loops that compiled."""

import dataclasses
from typing import Optional


@dataclasses.dataclass
class Throughput:
  """Examples, steps and seconds of the loops since the last `take`.

  A loop that traced and compiled the step is not added: its seconds say how
  long compiling took, not how fast training runs.
  """

  examples: int = 0
  steps: int = 0
  seconds: float = 0.0

  def add(self, *, examples: int, steps: int, seconds: float) -> None:
    self.examples += examples
    self.steps += steps
    self.seconds += seconds

  def take(self) -> tuple[Optional[float], Optional[float]]:
    """Returns (examples per second, steps per second) and starts over;
    (None, None) when no timed loop ran since the last call."""
    rates = ((self.examples / self.seconds, self.steps / self.seconds)
             if self.seconds > 0 else (None, None))
    self.examples, self.steps, self.seconds = 0, 0, 0.0
    return rates
