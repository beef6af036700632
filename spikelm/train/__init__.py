"""Training: recipes, data sources, packing and loaders, the tokenizer and its cache, the DeepSpeed loop, checkpoints,
the learning-rate schedule and the pre-launch plan. Stands on ``spikelm.model`` and ``spikelm.measure``."""
