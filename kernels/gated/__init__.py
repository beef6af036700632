"""gated scan (placeholder until implemented)."""


def gated_scan(*args, **kwargs):
    raise NotImplementedError("gated_scan is being written")
