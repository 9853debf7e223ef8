"""Hugging Face interop: exports of trained runs (samoe's own remote code, stock Mixtral and
Qwen2-MoE) and the tensor mappings they share with sparse upcycling."""
