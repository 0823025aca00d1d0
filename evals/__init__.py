"""Evaluations of a trained model, as recipes: NIAH retrieval (`evals.niah`) and validation
loss (`evals.loss`). `longdata eval ...` (`evals.cli`) only parses options and calls these.

This package sits above both the builder (`longdata`: NIAH prompts come from its anti-haystack
generator) and the trainer (`trainer`: models, packing-aware attention, the loss).
"""
