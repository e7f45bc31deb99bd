"""qwenjax's log lines, set up as vLLM sets up its own: the "qwenjax" logger prints INFO and above to stderr with a
timestamp, so `LLM()` in a plain script says what it loads and compiles.

Only the "qwenjax" logger is touched (JAX's INFO lines, such as the TPU backend it failed to find, stay quiet), and
its handler stands aside once the application configures logging itself (the root logger has a handler): records
then go there, once. `quiet_import_noise` drops transformers' import-time advice that PyTorch is missing, which
qwenjax never needs (it uses transformers' tokenizers and configs only).
"""

from __future__ import annotations

import logging

FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"
DATEFMT = "%m-%d %H:%M:%S"


class _WhileRootUnconfigured(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not logging.getLogger().handlers


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def configure(level: int = logging.INFO) -> None:
    """Idempotent: gives the "qwenjax" logger its default handler and, unless set already, level `level`."""
    logger = logging.getLogger("qwenjax")
    if not any(getattr(h, "qwenjax_default", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        handler.addFilter(_WhileRootUnconfigured())
        handler.qwenjax_default = True
        logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(level)


def quiet_import_noise() -> None:
    logging.getLogger("transformers").addFilter(_DropMessages("PyTorch was not found"))
