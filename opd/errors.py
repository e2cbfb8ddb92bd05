"""Errors that retrying cannot fix (bad input, failed gates): tasks fail at once on these."""


class PermanentError(Exception):
    """Deterministic failure; the message names what is wrong and the fix."""


class DataValidationFailed(PermanentError):
    pass


class GateFailed(PermanentError):
    pass
