"""seqzoo data layer: TFDS builders, tokenizers and the grain input pipeline."""


class DataError(ValueError):
    """Bad data input (missing directory, unknown dataset, corrupt file, ...).

    The message is one line naming the problem and the fix. `str()` always returns that message,
    even after TFDS prefixes the exception's args while re-raising it from inside a builder.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
