"""Self-supervised pretraining: config and recipes, meta-architecture, the loop, checkpoints, parallelism."""
