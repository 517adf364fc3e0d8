"""Training: the recipe (``train.py``) and its components (configuration, strategies, checkpoints)."""
