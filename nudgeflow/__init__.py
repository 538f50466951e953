"""nudgeflow."""
