"""rwkv6 scan (placeholder until implemented)."""
