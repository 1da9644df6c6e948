"""Writing a benchmark's results into its doc: the section under one `## ` heading is replaced (up to the
next `## ` heading), or appended when the doc has none; the rest of the doc stays as it is."""

from __future__ import annotations

from pathlib import Path


def write_heading_section(doc: Path, heading: str, section: str) -> None:
    """`section` starts with `heading`."""
    text = doc.read_text()
    if heading in text:
        start = text.index(heading)
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section.rstrip("\n") + "\n" + (text[end:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    doc.write_text(text)
