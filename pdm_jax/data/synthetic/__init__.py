"""The synthetic world: the embedded default dataset (no downloads) and its oracle segmenter."""
