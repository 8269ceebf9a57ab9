"""Training: the train state, trainable partitions, optimizers, objectives, the one step, the
numerical guard, checkpoints, preemption, the run directory, metrics, FLOPs and the loop."""
