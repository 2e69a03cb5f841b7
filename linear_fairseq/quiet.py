"""Quiet fairseq commands: the warnings fairseq's own use of hydra and torch
raises on every run, and the configuration dump, left out.

Only the messages listed here are filtered, each by the start of its text, so
any other warning still shows. LINEAR_FAIRSEQ_VERBOSE=1 keeps them all;
LINEAR_FAIRSEQ_LOG_CONFIG=1 keeps the configuration dump alone (the reproduce
scripts set it: their training logs record the whole configuration).
"""
import logging
import os
import warnings

# (category, the start of the message): raised by fairseq's calls, not by anything a user chose
KNOWN_WARNINGS = [
    (UserWarning, r"hydra\.experimental\.(initialize|compose)\(\) is no longer experimental"),
    (UserWarning, r"In '[\w/]+': Usage of deprecated keyword in package header"),
    (UserWarning, r"In '[\w/]+': Defaults list is missing `_self_`"),
    (UserWarning, r"\s*'\w+' is validated against ConfigStore schema with the same name"),
    (UserWarning, r"\s*The strict flag in the compose API is deprecated"),
    (Warning, r"\s*The version_base parameter is not specified"),  # hydra's Hydra14MigrationWarning
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found"),
    (UserWarning, r"Support for mismatched key_padding_mask and attn_mask is deprecated"),  # fairseq's softmax
    (FutureWarning, r"`torch\.cuda\.amp\.(autocast|GradScaler)\(args\.\.\.\)` is deprecated"),
]
# the fairseq commands that log their whole configuration at start
CONFIG_LOGGERS = ("fairseq_cli.train", "fairseq_cli.generate", "fairseq_cli.eval_lm", "fairseq_cli.interactive")


class _NoConfigDump(logging.Filter):
    """Drops a log record whose message is a whole configuration (a dict or DictConfig)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, dict) or type(record.msg).__name__ == "DictConfig")


def quiet_fairseq() -> None:
    if os.environ.get("LINEAR_FAIRSEQ_VERBOSE"):
        return
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if os.environ.get("LINEAR_FAIRSEQ_LOG_CONFIG"):
        return
    for name in CONFIG_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoConfigDump) for f in logger.filters):
            logger.addFilter(_NoConfigDump())
