"""Evaluators and their plots: classification metrics, k-NN on frozen features, curves and matrices."""
