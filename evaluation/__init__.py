"""Evaluation: datasets by name from a local folder or the hub, and WikiText-2 perplexity."""
