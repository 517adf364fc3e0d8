"""The native Phi-3(.5)-vision model, one file per piece as in transformers' per-model folders:
configuration, modeling, image processing, processing, Auto-class registration, and the tiny preset."""
