"""`dist-train doctor`: is this machine, and this cluster, ready to train?

    dist-train doctor                       # or: python -m dist_train.doctor
    dist-train doctor --cpu_replicas=2 --model_dir=/tmp/dist_train/doctor
    python -m launch.local --num_workers=2 -- doctor --timeout_s=30
    srun --ntasks=4 dist-train doctor --model_dir=gs://bucket/run

It prints the versions of Python, TensorFlow, Keras and dist_train, the
CUDA, cuDNN and NCCL TensorFlow was built with, the cluster this process
would join (TF_CONFIG or a SLURM job step, read as the training run reads
it: this task and its peers' addresses) and the devices, then runs a smoke
test: every worker reaches every other (rendezvous.py), an all-reduce over
every replica of every worker gives the right sum, and with --model_dir a
checkpoint is written there and read back (checks.py). Each step that waits
has --timeout_s. It exits 0 when every check passes; otherwise it prints one
`dist_train doctor: error: ...` line naming what failed (e.g. `worker 1
(127.0.0.1:23457) did not join the all-reduce within 60 s ...`) and exits 1.

Run it like the training: the same launcher, the same environment. Under
`launch.local`, `doctor` as the first word after `--` runs it on every
worker (`python -m dist_train.main doctor ...` starts it).
"""
