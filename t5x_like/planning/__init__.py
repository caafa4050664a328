"""Planning a cluster from a CPU host: the train step compiled ahead of time on a
cluster's mesh (`planner`), with the memory and collectives models it reports."""
