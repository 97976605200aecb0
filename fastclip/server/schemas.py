"""Request bodies of the service (pydantic, unknown fields rejected) and the item scheme.

An ``input`` is a string or a list of items. Each item is either

* a string: an image if it starts with ``data:image/`` (a base64 data URI), otherwise a text;
* ``{"type": "text", "text": "..."}``; or
* ``{"type": "image", "image": "<data URI | bare base64 | http(s) URL>"}`` (URLs only from allowed hosts).

Token arrays (OpenAI's list-of-ints form) are refused with a message saying so. Every error names the
item as ``input[i]`` and the reason; the route turns it into a 400.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, StrictInt, field_validator

_ITEM_KEYS = {"text": "text", "image": "image"}


class Item(BaseModel):
    """One parsed input item: ``kind`` "text" or "image"; ``value`` the text, or the image reference."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["text", "image"]
    value: str


def _is_token(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_item(i: int, x, *, images_only: bool) -> Item:
    where = f"input[{i}]"
    if isinstance(x, str):
        if images_only or x.startswith("data:image/"):
            return Item(kind="image", value=x)
        if not x.strip():
            raise ValueError(f"{where}: empty text")
        return Item(kind="text", value=x)
    if isinstance(x, dict):
        kind = x.get("type")
        if kind not in _ITEM_KEYS or (images_only and kind != "image"):
            allowed = '"image"' if images_only else '"text" or "image"'
            raise ValueError(f"{where}: an object item needs \"type\": {allowed}, got {kind!r}")
        key = _ITEM_KEYS[kind]
        unknown = sorted(set(x) - {"type", key})
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))} in a {kind} item")
        if not isinstance(x.get(key), str):
            raise ValueError(f"{where}: a {kind} item needs \"{key}\" as a string")
        if kind == "text" and not x[key].strip():
            raise ValueError(f"{where}: empty text")
        return Item(kind=kind, value=x[key])
    if _is_token(x) or isinstance(x, list):
        raise ValueError(f"{where}: token arrays are not supported; send the text itself")
    raise ValueError(f"{where}: expected a string or an object item, got {type(x).__name__}")


def parse_items(value, *, images_only: bool = False) -> list[Item]:
    """The ``input`` field (a string or a list) -> list of Items; ValueError naming the bad item."""
    if isinstance(value, str):
        return [_parse_item(0, value, images_only=images_only)]
    if not isinstance(value, list):
        raise ValueError(f"input must be a string or a list of items, got {type(value).__name__}")
    if not value:
        raise ValueError("input must not be empty")
    if all(_is_token(x) for x in value):
        raise ValueError("token arrays are not supported; send the text itself")
    return [_parse_item(i, x, images_only=images_only) for i, x in enumerate(value)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbeddingRequest(_Strict):
    """``POST /v1/embeddings`` (OpenAI's fields; ``dimensions`` must equal the model's if given)."""

    input: list[Item]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _items(cls, value):
        return parse_items(value)


class ClassifyRequest(_Strict):
    """``POST /v1/classify``: images (every item is an image) scored against zero-shot ``labels``.

    ``templates`` are prompt templates with a ``{}`` placeholder, averaged per label (default
    ``"a photo of a {}."``).
    """

    input: list[Item]
    labels: list[str]
    templates: list[str] | None = None
    model: str | None = None
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _items(cls, value):
        return parse_items(value, images_only=True)

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels):
        if not labels:
            raise ValueError("labels must not be empty")
        for i, label in enumerate(labels):
            if not label.strip():
                raise ValueError(f"labels[{i}]: empty label")
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be distinct")
        return labels

    @field_validator("templates")
    @classmethod
    def _templates(cls, templates):
        if templates is None:
            return None
        if not templates:
            raise ValueError("templates must not be empty (omit the field for the default)")
        for i, t in enumerate(templates):
            if t.count("{}") != 1 or t.replace("{}", "").count("{") or t.replace("{}", "").count("}"):
                raise ValueError(f"templates[{i}]: needs exactly one '{{}}' placeholder and no other braces")
        return templates
