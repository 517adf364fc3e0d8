"""phi3v_train: the native Phi-3(.5)-vision model and processor, trainer, evaluation and export.

Importing the package registers `phi3_v` with transformers' Auto classes (AutoConfig,
AutoModelForCausalLM, AutoImageProcessor, AutoProcessor), so official Phi-3.5-vision directories
and the tiny preset load with `trust_remote_code` left off.
"""

from __future__ import annotations

from phi3v_train.model.registration import register_auto_classes

register_auto_classes()
