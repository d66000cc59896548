"""Training objectives (losses) that read the values a family's units produce."""
