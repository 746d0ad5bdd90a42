"""Neural network modules (Flax linen)."""
