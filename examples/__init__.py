"""Example tasks for dist_train, outside the library: each is a `--task`
(`examples.<module>:task`) with a flagfile in launch/flags/."""
