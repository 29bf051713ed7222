"""Whole-model evaluation: a transformers model runner with the converted MoE layers swapped in, and GSM8K."""
