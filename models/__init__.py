"""Architecture adapters and model loading."""
