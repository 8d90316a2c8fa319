"""A peer of `dist-train doctor` that answers its rendezvous, then dies
before TensorFlow's join: what a worker whose process ends at the wrong
moment looks like to the others.

    python tests/helpers/doctor_peer.py MY_ADDRESS MY_NAME PEER_ADDRESS PEER_NAME
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

from dist_train.doctor import rendezvous  # pylint: disable=wrong-import-position


def main(argv):
  my_address, my_name, peer_address, peer_name = argv[1:]
  rendezvous.meet(me=rendezvous.Task(my_name, my_address),
                  peers=[rendezvous.Task(peer_name, peer_address)],
                  timeout_s=120)
  print("met", flush=True)


if __name__ == "__main__":
  main(sys.argv)
