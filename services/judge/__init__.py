"""prefloop judge service."""
