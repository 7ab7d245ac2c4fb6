"""plait plugin tensorboard: TensorBoard event files of a run's metrics."""
