"""Integrations with training frameworks; each is an optional extra."""
