"""pyllama."""
