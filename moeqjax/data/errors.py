"""The error type raised for user mistakes in data loading, tokenization and batching."""


class DataError(ValueError):
    """A data path, format or argument is wrong; the message says what and how to fix it."""
