"""Logging into the file HTCondor's config names, in HTCondor's log format and rotation."""

from __future__ import annotations

import logging
import logging.handlers
import os

# HTCondor daemons write `MM/DD/YY HH:MM:SS message`; keeping it lets admins read our log
# with the same eyes and tools (and condor_fetchlog) as the others.
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%m/%d/%y %H:%M:%S"


def configure(path: str, max_bytes: int = 10_000_000, debug: bool = False) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        handler: logging.Handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=1
        )
        # HTCondor keeps one previous log as <name>.old, not <name>.1.
        handler.namer = lambda name: name[:-2] + ".old" if name.endswith(".1") else name
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # boto's own debug output can carry request bodies; never let it near the log.
    for noisy in ("botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
