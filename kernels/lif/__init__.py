"""lif scan (placeholder until implemented)."""
