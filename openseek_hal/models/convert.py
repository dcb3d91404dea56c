"""`openseek-hal convert`: Hugging Face <-> native checkpoints."""

from ..cli import not_yet

convert = not_yet("convert", "issue #6: DeepSeek-V3 model and HF checkpoints")
