"""Tasks: what to train and on what (model, data, loss, metrics); the built-in
classification task and examples."""

from dist_train.tasks.base import Task
from dist_train.tasks.base import TaskError
