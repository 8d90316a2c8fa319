"""Tasks: what to train and on what (model, data, loss, metrics); the task
protocol and the built-in classification task (example tasks: examples/)."""

from dist_train.tasks.base import Task
from dist_train.tasks.base import TaskError
