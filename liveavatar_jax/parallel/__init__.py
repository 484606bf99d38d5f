"""Multi-device and multi-host execution: the TPP mesh and sharding rules (`mesh`), the timestep-forcing pipeline
engine (`tpp`) and `jax.distributed` start-up (`distributed`)."""
