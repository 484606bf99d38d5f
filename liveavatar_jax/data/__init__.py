"""Training data: the on-disk example format, the grain loader and preprocessing from video files."""
