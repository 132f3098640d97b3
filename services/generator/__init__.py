"""prefloop generator service."""
