"""Where plugin modules come from: file paths today; HTTP and OCI registries next (issue 4)."""

from .sources import FetchError, fetch_module

__all__ = ["FetchError", "fetch_module"]
