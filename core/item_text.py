"""The text an item is embedded from: the offline build and online upserts must use the same
recipe, or a new item lands elsewhere in the text space than a catalog item with the same words."""
from __future__ import annotations


def item_text(title: str, text: str = "", category: str = "") -> str:
    """Title, then text, then category."""
    return f"{title}. {text} {category}".strip()
