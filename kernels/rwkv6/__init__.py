"""rwkv6 scan (placeholder until implemented)."""


def rwkv6_scan(*args, **kwargs):
    raise NotImplementedError("rwkv6_scan is being written")
