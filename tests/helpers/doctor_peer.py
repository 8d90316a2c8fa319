"""A peer of `dist-train doctor` that dies at the wrong moment: it answers
the doctor's rendezvous, then exits before TensorFlow's join, or (with
`join`) joins the cluster and exits before the all-reduce.

    python tests/helpers/doctor_peer.py MY_ADDRESS MY_NAME \
        PEER_ADDRESS PEER_NAME [join]

With `join`, TF_CONFIG must describe the cluster, as for the doctor.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

# pylint: disable=wrong-import-position
from dist_train.distribute import cluster
from dist_train.doctor import rendezvous


def main(argv):
  my_address, my_name, peer_address, peer_name = argv[1:5]
  rendezvous.meet(me=rendezvous.Task(my_name, my_address),
                  peers=[rendezvous.Task(peer_name, peer_address)],
                  timeout_s=120)
  print("met", flush=True)
  if argv[5:] == ["join"]:
    # pylint: disable-next=import-outside-toplevel
    from dist_train.distribute import strategy
    strategy.create_strategy(cluster.resolve(
        strategy="auto", cluster="auto", cpu_replicas=None,
        environ=os.environ))
    print("joined", flush=True)
    os._exit(0)  # pylint: disable=protected-access


if __name__ == "__main__":
  main(sys.argv)
