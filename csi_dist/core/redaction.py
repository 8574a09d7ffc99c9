"""Keep secrets out of logs and saved configs: values of secret-named environment variables are masked."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys

# WANDB_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY, DB_PASSWORD, ... but not TOKENIZERS_PARALLELISM
SECRET_NAME = re.compile(r"(^|_)(API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)(_|$)", re.IGNORECASE)
MIN_SECRET_LENGTH = 6  # shorter values ("1", "true") would mask ordinary words
MASK = "***"


def secret_values() -> list[str]:
    """Values of the secret-named environment variables, longest first (so no secret is masked only in part)."""
    values = {value for name, value in os.environ.items()
              if SECRET_NAME.search(name) and len(value) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    for secret in secret_values():
        text = text.replace(secret, MASK)
    return text


class SecretFilter(logging.Filter):
    """Masks secrets in a record's message and traceback before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_secret_filter() -> None:
    """Mask secrets on every handler of the root logger (call after logging.basicConfig)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(existing, SecretFilter) for existing in handler.filters):
            handler.addFilter(SecretFilter())


@contextlib.contextmanager
def masked_argv():
    """sys.argv with secrets masked, for libraries that record the command line (W&B's run metadata does)."""
    original = sys.argv
    sys.argv = [redact(argument) for argument in original]
    try:
        yield
    finally:
        sys.argv = original
