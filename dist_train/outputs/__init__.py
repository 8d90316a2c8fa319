"""What a run writes: checkpoints, summaries, the export, and its claim on model_dir."""
