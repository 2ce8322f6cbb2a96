"""Logging to the console and the run's train.log; TensorBoard scalars and images."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

LOGGER_NAME = "sdxl_trainer"


def get_logger(name: str | None = None) -> logging.Logger:
    return logging.getLogger(LOGGER_NAME if name is None else f"{LOGGER_NAME}.{name}")


def setup_logging(log_file: Path | None = None, level: int = logging.INFO, main_process: bool = True) -> logging.Logger:
    """Console (stderr) + optional file handler; idempotent across calls in one process."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level if main_process else logging.WARNING)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if log_file is not None and main_process:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(file_handler)
    return logger


class TensorBoardLogger:
    """Scalars and images to `logs/`; a null object when disabled (no scattered ifs in the loop)."""

    def __init__(self, log_dir: Path | None):
        self._writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)

    def image(self, tag: str, image_hwc_uint8, step: int) -> None:
        if self._writer is None:
            return
        self._writer.add_image(tag, image_hwc_uint8, step, dataformats="HWC")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
