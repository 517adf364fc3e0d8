"""Registers the native `phi3_v` classes with transformers' Auto classes (idempotent)."""

from __future__ import annotations

_REGISTERED = False


def register_auto_classes() -> None:
    """AutoConfig / AutoModelForCausalLM / AutoImageProcessor / AutoProcessor for `phi3_v`."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoProcessor,
    )

    from phi3v_train.model.configuration_phi3_v import Phi3VConfig
    from phi3v_train.model.image_processing_phi3_v import Phi3VImageProcessor
    from phi3v_train.model.modeling_phi3_v import Phi3VForCausalLM
    from phi3v_train.model.processing_phi3_v import Phi3VProcessor

    AutoConfig.register("phi3_v", Phi3VConfig, exist_ok=True)
    AutoModelForCausalLM.register(Phi3VConfig, Phi3VForCausalLM, exist_ok=True)
    AutoImageProcessor.register(
        Phi3VConfig,
        image_processor_classes={"pil": Phi3VImageProcessor, "torchvision": Phi3VImageProcessor},
        exist_ok=True,
    )
    AutoProcessor.register(Phi3VConfig, Phi3VProcessor, exist_ok=True)
    _REGISTERED = True
