"""Where each page and image of the report lives, as paths relative to the report's root.

Pages link to each other with relative URLs (``root`` + one of these paths, where ``root`` is
``""``, ``"../"`` or ``"../../"`` for the page's depth), so the folder opens from the file system
and can be moved or zipped. Path parts that come from the atlas (run ids, graph ids) are reduced
to ``[A-Za-z0-9._-]`` so they are safe both as file names and in URLs.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def slug(value: object) -> str:
    """A file- and URL-safe rendering of an id (unsafe characters become ``_``)."""
    text = _UNSAFE.sub("_", str(value))
    return text if text.strip(".") else "_" + text


def feature_key(layer: int, stream: str, feature: int) -> str:
    """The atlas's notation of a feature, e.g. ``L3.img.644`` (as in trace target specs)."""
    return f"L{layer}.{stream}.{feature}"


def feature_page(run_id: str, layer: int, stream: str, feature: int) -> str:
    """Path of a feature's page."""
    return f"features/{slug(run_id)}/{slug(feature_key(layer, stream, feature))}.html"


def feature_list_page(run_id: str, layer: int, stream: str) -> str:
    """Path of the page listing every feature of one (run, layer, stream)."""
    return f"features/{slug(run_id)}/list-L{int(layer)}-{slug(stream)}.html"


def prompt_page(run_id: str, prompt_id: int) -> str:
    """Path of a generation's (prompt page's) page."""
    return f"prompts/{slug(run_id)}/{int(prompt_id)}.html"


def graph_page(run_id: str, graph_id: str) -> str:
    """Path of an attribution graph's page."""
    return f"graphs/{slug(run_id)}/{slug(graph_id)}.html"


def analysis_page(name: str) -> str:
    """Path of an analysis page."""
    return f"analyses/{slug(name)}.html"


def image_file(run_id: str, prompt_id: int) -> str:
    """Path of a generation's image copied into the report (upscaled if small)."""
    return f"img/{slug(run_id)}/{int(prompt_id)}.png"


def thumb_file(run_id: str, prompt_id: int) -> str:
    """Path of a generation's thumbnail (only written for images larger than the thumbnail size)."""
    return f"img/{slug(run_id)}/thumb-{int(prompt_id)}.png"


PROMPT_LIST = "prompts/index.html"
GRAPH_LIST = "graphs/index.html"
STYLE = "assets/style.css"


def root_of(path: str) -> str:
    """The relative prefix from a page at ``path`` back to the report root."""
    return "../" * path.count("/")
