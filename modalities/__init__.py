"""What a sample of each modality is: text tokens, image tensors, audio waveforms and
log-mels, and how samples with missing modalities batch together."""

MODALITIES = ("text", "image", "audio")
