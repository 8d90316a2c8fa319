"""Each --strategy trains with the replicas it promises."""

from tests.helpers import processes


def test_one_device_trains_with_one_replica(tmp_path):
  result = processes.run_cli(
      f"--model_dir={tmp_path / 'run'}", "--strategy=one_device",
      "--dataset=synthetic", "--num_train_examples=96",
      "--num_validation_examples=32", "--global_batch_size=32",
      "--epochs=1", check=True)
  assert "Strategy OneDeviceStrategy with 1 replica(s) on /cpu:0" in (
      result.stderr)
  assert "MirroredStrategy" not in result.stderr
  assert ("Training 96 examples, validating 32, in global batches of 32 "
          "(3 steps per epoch) on 1 replica(s)") in result.stderr
  assert "epoch 1/1 done at step 3 " in result.stderr
