"""Datasets in their published layouts, the missing-modality protocol, and the generated shapes world.

Import the modules directly (each says what it holds); this package imports nothing heavy.
"""
