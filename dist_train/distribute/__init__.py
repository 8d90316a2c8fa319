"""Distribution: the cluster a process belongs to, and the strategy built for it."""
