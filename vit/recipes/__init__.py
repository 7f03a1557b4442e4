"""Recipes (config files) for the demo datasets, and the real-data acceptance runs that use them."""
