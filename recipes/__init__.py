"""Recipes: training, evaluation and benchmarks."""
