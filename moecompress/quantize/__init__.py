"""Quantization algorithms: pure functions from a weight (and its Hessian) to group-wise integers and scales."""
