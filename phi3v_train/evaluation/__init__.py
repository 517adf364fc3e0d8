"""Evaluation: generation over a split, and the metrics of the original recipe."""
