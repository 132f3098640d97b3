"""prefloop gateway service."""
