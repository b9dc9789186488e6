"""The AWS regions the installed botocore knows, for checking a region before any call."""

from __future__ import annotations

import functools
import re


@functools.cache
def known_regions() -> tuple[frozenset[str], tuple[re.Pattern[str], ...]]:
    """The regions botocore's own endpoint data knows (every partition), and each partition's
    region pattern (for regions newer than the installed botocore). Read from files shipped
    with botocore: no AWS call."""
    import botocore.loaders  # noqa: PLC0415 - only the helper checks regions; boto is heavy

    data = botocore.loaders.create_loader().load_data("endpoints")
    known: set[str] = set()
    patterns = []
    for partition in data.get("partitions", []):
        known.update(partition.get("regions", {}))
        if partition.get("regionRegex"):
            patterns.append(re.compile(partition["regionRegex"], re.ASCII))
    return frozenset(known), tuple(patterns)
