"""lif scan (placeholder until implemented)."""


def lif_scan(*args, **kwargs):
    raise NotImplementedError("lif_scan is being written")
