"""Samplers: vLLM (kept alive across rounds, weights published in place) and transformers ``generate``."""
