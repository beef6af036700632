"""Training: recipes, data sources and packing, the tokenizer and its cache, the DeepSpeed loop, checkpoints and the
learning-rate schedule. Stands on ``spikelm.model`` and ``spikelm.measure``."""
