"""The toy shapes world: procedural images with ground truth, and the miniature models trained on it."""
