"""plait plugin ema: an exponential moving average of the weights."""
