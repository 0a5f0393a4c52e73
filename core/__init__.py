"""The bottom layer: errors, offline setup, letterbox geometry and run-length encoding.

Imports nothing from the rest of the project (tests/test_layers.py enforces it), so every package may import it.
Layer order, lowest first: core <- transport, conveyor <- codec <- pipeline <- stages <- benchmarks.
"""
