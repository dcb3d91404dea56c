"""Models: the DeepSeek-V3 family (MLA, MoE, MTP), presets, Hugging Face conversion."""
