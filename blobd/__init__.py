"""blobd: a self-hosted, content-addressed blob server for audio."""

__version__ = "0.1.0"
