"""Models: the DeepSeek-V3 family (MLA, MoE, MTP), presets, Hugging Face conversion."""

from .deepseek_v3 import (
    PRESETS,
    DeepseekV3,
    DeepseekV3Config,
    ModelLoss,
    build_model,
    load_hf,
    load_native,
    preset,
    save_hf,
    save_native,
)

__all__ = ["PRESETS", "DeepseekV3", "DeepseekV3Config", "ModelLoss", "build_model", "load_hf", "load_native",
           "preset", "save_hf", "save_native"]
