"""Shipped example data (installed as ``landscape_data``): the 8x8 digits, example models and checkpoints."""
