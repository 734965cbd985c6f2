"""The browser's screens; each owns its key bindings."""
