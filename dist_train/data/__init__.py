"""Data: the data sets, and the input pipelines that feed global batches to the loop."""
