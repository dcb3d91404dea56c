"""DeepSeek-V3 (MLA, DeepSeekMoE, MTP): config, presets, model, HF adapter and checkpoint formats."""

from .build import build_model, resolve_config
from .checkpoints import load_hf, load_native, save_hf, save_native
from .config import DeepseekV3Config
from .model import DeepseekV3, FP8Linear, ModelLoss, enable_fp8, require_fp8
from .presets import PRESETS, preset

__all__ = ["PRESETS", "DeepseekV3", "DeepseekV3Config", "FP8Linear", "ModelLoss", "enable_fp8",
           "require_fp8", "build_model", "load_hf", "load_native",
           "preset", "resolve_config", "save_hf", "save_native"]
