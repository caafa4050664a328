"""Training: the train state and jitted steps, optimizers, the host loader, the loop,
checkpoints, guards (locks, preemption, loss spikes), metrics, and `train.train`, the run
that ties them together."""
