"""Tasks: the durable store, queues by class and priority, limits, resources and GPUs."""
