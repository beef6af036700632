"""rwkv4 scan (placeholder until implemented)."""
