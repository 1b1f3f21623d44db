"""Tiny in-process models and tokenizers for tests and offline fallbacks: no downloads."""
