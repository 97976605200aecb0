"""Exception types raised by fastclip. Every message names the item, key or file concerned."""


class FastclipError(Exception):
    """Base class of every error fastclip raises on purpose."""


class UnknownModelError(FastclipError, KeyError):
    """An architecture name, pretrained tag or hub id that fastclip does not know."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(FastclipError, ValueError):
    """A checkpoint file is corrupt, has missing/unexpected/mis-shaped keys, or is unsafe to load."""


class BackendUnavailableError(FastclipError, RuntimeError):
    """An explicitly requested backend cannot run here."""


class ItemError(FastclipError, ValueError):
    """One item of a batch (an image or a text) could not be used.

    Attributes:
        index: position of the item in the batch given by the caller (or None).
        item: a short description of the item (a path, or the type of the object).
        reason: why it failed.
    """

    def __init__(self, reason: str, *, index=None, item=None):
        self.index, self.item, self.reason = index, item, reason
        where = []
        if index is not None:
            where.append(f"item {index}")
        if item is not None:
            where.append(repr(item) if isinstance(item, str) else str(item))
        prefix = " ".join(where)
        super().__init__(f"{prefix}: {reason}" if prefix else reason)


class ImageLoadError(ItemError):
    """An image item is missing, corrupt, too large or of an unsupported kind."""
