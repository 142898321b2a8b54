"""Training: the loop, checkpoints, the runtime (devices, precision, processes), sharding and cost accounting."""
