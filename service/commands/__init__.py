"""Subcommands of `tessera` that belong to the serving layer (serve, query, caption)."""
