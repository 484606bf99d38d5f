"""Command-line entry points of the training stages (thin wrappers over liveavatar_jax.distill.trainer)."""
