"""Signals that apps above `gateway` connect to, so it never imports them."""

from django.dispatch import Signal

# Sent after DEFAULT_API_KEYS are loaded. Arguments: specs (the ApiKeySpec entries).
default_keys_loaded = Signal()
