"""Each TensorFlow, Keras and absl internal that dist_train/compat.py relies
on still holds: a failure names the use and the version it was checked on,
so that an upgrade that breaks one says which."""

import contextlib
import importlib.metadata
import inspect
import io
import json
import textwrap
import zipfile

from absl import flags
import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from dist_train import compat
from tests.helpers import processes


@contextlib.contextmanager
def holds(use: str, package: str):
  """Turns any failure inside into one naming `use` and both versions."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    pytest.fail(
        f"dist_train.compat: {use} no longer holds on {package} "
        f"{importlib.metadata.version(package)} (checked on "
        f"{compat.CHECKED_ON[package]}): {type(e).__name__}: {e}; update "
        "dist_train/compat.py", pytrace=False)


def test_shuffle_with_a_seed_tensor_is_dataset_shuffle():
  with holds("tf.data's shuffle with a seed tensor (_ShuffleDataset, "
             "random_seed.get_seed)", "tensorflow"):
    examples = tf.data.Dataset.range(40)
    seeds = [0, 5, 2**31 - 1]
    expected = [list(examples.shuffle(
        16, seed=s, reshuffle_each_iteration=False).as_numpy_iterator())
                for s in seeds]
    assert [list(compat.shuffle(examples, 16, s).as_numpy_iterator())
            for s in seeds] == expected
    lazy = tf.data.Dataset.from_tensor_slices(
        tf.constant(seeds, tf.int64)).flat_map(
            lambda s: compat.shuffle(examples, 16, s))
    assert list(lazy.as_numpy_iterator()) == sum(expected, [])


def test_batching_is_found_upstream():
  with holds("tf.data's Dataset._inputs() and the batching datasets' class "
             "names", "tensorflow"):
    pairs = tf.data.Dataset.range(10).map(lambda i: (i, i))
    assert not compat.is_batched(pairs)
    assert compat.is_batched(pairs.batch(2).map(lambda x, y: (x, y)))
    assert compat.is_batched(pairs.padded_batch(2).prefetch(1))
    assert compat.is_batched(pairs.ragged_batch(2))
    assert not compat.is_batched(pairs.batch(2).unbatch().shuffle(4))


def test_collectives_can_be_aborted():
  # Aborting for real would fail this process' collectives: the signature
  # is checked here, the abort by tests/e2e/test_multi_worker.py's stalled
  # peer.
  with holds("Context.abort_collective_ops(code, message)", "tensorflow"):
    # pylint: disable-next=g-direct-tensorflow-import
    from tensorflow.python.eager import context
    parameters = inspect.signature(
        context.context().abort_collective_ops).parameters
    assert list(parameters) == ["code", "message"]


def test_the_coordination_barrier_can_be_waited_at():
  # Used by `dist-train doctor` on a cluster (tests/e2e/test_doctor.py).
  with holds("Context.wait_at_barrier(barrier_id, timeout_in_ms)",
             "tensorflow"):
    # pylint: disable-next=g-direct-tensorflow-import
    from tensorflow.python.eager import context
    parameters = inspect.signature(
        context.context().wait_at_barrier).parameters
    assert list(parameters) == ["barrier_id", "timeout_in_ms"]


def test_keras_file_layout_and_layer_paths(tmp_path):
  with holds("the .keras zip layout (model.weights.h5) and Keras' layer "
             "paths (to_snake_case, numbered in model order)", "keras"):
    # Layer names count up within a Keras session: start a new one, as a
    # process that builds one model does.
    keras.backend.clear_session()
    inputs = keras.Input((4,))
    x = keras.layers.Dense(3, name="hidden")(inputs)
    x = keras.layers.BatchNormalization()(x)
    outputs = keras.layers.Dense(2, name="predictions")(x)
    model = keras.Model(inputs, outputs)
    path = str(tmp_path / "model.keras")
    model.save(path)
    with h5py.File(io.BytesIO(compat.read_keras_weights(path)), "r") as f:
      stored = {"layers/" + name for name in f["layers"]
                if len(f["layers"][name].get("vars", {}))}
    paths = compat.keras_layer_paths(model)
    assert stored == {p for p, name in paths.items()
                      if model.get_layer(name).weights}
    assert paths["layers/dense"] == "hidden"
    assert paths["layers/dense_1"] == "predictions"
    assert paths["layers/batch_normalization"] == "batch_normalization"
    with pytest.raises((OSError, KeyError, zipfile.BadZipFile)):
      compat.read_keras_weights(str(tmp_path / "missing.keras"))


def test_the_flagfile_being_read_is_found(tmp_path):
  with holds("absl's FlagValues._get_flag_file_lines(filename, ...)",
             "absl-py"):
    bad = tmp_path / "bad.cfg"
    bad.write_bytes(b"--epochs=\xff\n")
    outer = tmp_path / "outer.cfg"
    outer.write_text(f"--flagfile={bad}\n")
    with pytest.raises(UnicodeDecodeError) as error:
      flags.FlagValues()(["prog", f"--flagfile={outer}"])
    assert compat.flagfile_being_read(error.value) == str(bad)


def test_op_error_text_in_the_input_pipeline():
  with holds("tf.data's error text (Error in user-defined function passed "
             "to ...)", "tensorflow"):
    dataset = tf.data.Dataset.range(3).map(
        lambda i: tf.debugging.check_numerics(tf.cast(i, tf.float32) / 0.0,
                                              "bad feature"))
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
      list(dataset.as_numpy_iterator())
    summary = compat.op_error_summary(error.value.message)
    assert summary.startswith("in the input pipeline (MapDataset): "), summary
    assert "bad feature" in summary and "[[" not in summary


_REPLICA_ERROR = """
import json
import tensorflow as tf
from dist_train import compat
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
ids = strategy.experimental_distribute_values_from_function(
    lambda context: tf.constant(context.replica_id_in_sync_group))

@tf.function
def step(ids):
  def replica_step(i):
    tf.debugging.assert_less(i, 1, message="replica failed")
    return i
  return strategy.run(replica_step, args=(ids,))

try:
  step(ids)
except tf.errors.OpError as e:
  node = compat.error_node(e.message)
  print(json.dumps({"summary": compat.op_error_summary(e.message),
                    "node": node, "replica": compat.node_replica(node)}))
"""


def test_op_error_text_of_a_replica():
  with holds("TensorFlow's op error text under MirroredStrategy (root "
             "errors, {{node replica_<i>/...}})", "tensorflow"):
    result = processes.run_python(["-c", textwrap.dedent(_REPLICA_ERROR)],
                                  timeout=120, prewarmed=True)
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["summary"].startswith("assertion failed: [replica failed]")
    assert "[[" not in found["summary"]
    assert found["node"].startswith("replica_1/"), found
    assert found["replica"] == 1


def test_checkpoint_shape_mismatch_text(tmp_path):
  with holds("Keras' shape check on restore (variable.shape=..., Received: "
             "value.shape=..., path=...)", "keras"):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])

    def model(num_inputs):
      with strategy.scope():
        return keras.Sequential([keras.Input((num_inputs,)),
                                 keras.layers.Dense(2, name="head")])
    path = tf.train.Checkpoint(model=model(4)).save(str(tmp_path / "ckpt"))
    with pytest.raises(Exception) as error:
      tf.train.Checkpoint(model=model(3)).restore(path)
    match = compat.CHECKPOINT_SHAPE_MISMATCH.search(str(error.value))
    assert match, str(error.value)[:500]
    assert (match["model"], match["checkpoint"]) == ("(3, 2)", "(4, 2)")
    assert match["name"].endswith("head/kernel"), match["name"]


def test_batch_norm_moments_can_be_replaced_and_sublayers_found():
  with holds("Layer._flatten_layers(include_self, recursive) and "
             "BatchNormalization.call's self._moments(inputs, mask)",
             "keras"):
    inner = keras.Sequential([keras.layers.BatchNormalization(momentum=0.5)])
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inner(inputs)))
    layers = [l for l in compat.sublayers(model)
              if isinstance(l, keras.layers.BatchNormalization)]
    assert layers == [inner.layers[0]]
    calls = []

    def moments(x, mask):
      calls.append(mask)
      return tf.constant([1.0, 2.0]), tf.constant([4.0, 9.0])

    compat.replace_batch_norm_moments(layers[0], moments)
    outputs = inner(tf.constant([[3.0, 5.0]]), training=True)
    assert calls == [None]
    epsilon = layers[0].epsilon
    assert outputs.numpy()[0].tolist() == pytest.approx(
        [2 / (4 + epsilon) ** 0.5, 3 / (9 + epsilon) ** 0.5], abs=1e-6)
    assert layers[0].moving_mean.numpy().tolist() == [0.5, 1.0]


@pytest.mark.parametrize("loss_scaling", [False, True])
def test_the_optimizers_summed_gradients_can_be_observed(loss_scaling):
  """The observer sees the gradient each variable is updated with, unscaled
  under loss scaling, in the variables' order, None where a variable has
  none (summed over the replicas: the health tests on 2 replicas and 2
  workers compare its norm with a hand replay)."""
  with holds("TFOptimizer._all_reduce_sum_gradients(grads_and_vars) and "
             "_var_key, called by apply in replica context", "keras"):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
      variables = [tf.Variable([1.0, 2.0]), tf.Variable(3.0),
                   tf.Variable([4.0])]
      optimizer = keras.optimizers.SGD(learning_rate=0.5)
      if loss_scaling:
        optimizer = keras.optimizers.LossScaleOptimizer(
            optimizer, initial_scale=64.0)
      optimizer.build(variables)
    seen = []
    compat.observe_summed_gradients(
        optimizer, variables,
        lambda summed: seen.append([None if g is None else g.numpy()
                                    for g in summed]))
    scale = 64.0 if loss_scaling else 1.0
    gradients = [tf.constant([0.5, -1.0]) * scale, None,
                 tf.constant([2.0]) * scale]
    strategy.run(lambda: optimizer.apply_gradients(zip(gradients, variables)))
    assert len(seen) == 1
    np.testing.assert_allclose(seen[0][0], [0.5, -1.0])
    assert seen[0][1] is None
    np.testing.assert_allclose(seen[0][2], [2.0])
    np.testing.assert_allclose(variables[0].numpy(), [0.75, 2.5])
