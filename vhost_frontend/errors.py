"""The one exception the frontend raises for a backend that misbehaves."""


class FrontendError(Exception):
    """The backend answered something unexpected (or not at all)."""
