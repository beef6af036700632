"""rwkv4 scan (placeholder until implemented)."""


def rwkv4_scan(*args, **kwargs):
    raise NotImplementedError("rwkv4_scan is being written")
