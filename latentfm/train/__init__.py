"""Train states, the shared training loop, sharding and checkpoints."""
