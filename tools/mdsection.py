"""Replace one `## ` section of a markdown file (the benchmark scripts' `--write`)."""

from __future__ import annotations

import os
import pathlib


def write_section(path, heading: str, text: str) -> None:
    """Put `text` (which starts with `heading`) in place of the section that starts with `heading` (up to
    the next `## ` heading), or append it; written atomically."""
    target = pathlib.Path(path)
    old = target.read_text(encoding="utf-8") if target.exists() else "# Benchmarks\n"
    text = text.rstrip("\n") + "\n"
    start = old.find(heading)
    if start >= 0:
        end = old.find("\n## ", start + len(heading))
        new = old[:start] + text + ("\n" + old[end + 1:] if end >= 0 else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    tmp = target.with_name("." + target.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, target)
