"""Errors meant for people: the CLI prints them without a traceback."""


class SpikeLMError(Exception):
    """A user-facing error: bad recipe, missing file, mismatched tokenizer... The message says how to fix it."""
