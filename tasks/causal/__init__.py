"""Instruction tuning of decoder LLMs: every stage for task causal_lm."""
