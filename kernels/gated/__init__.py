"""gated scan (placeholder until implemented)."""
