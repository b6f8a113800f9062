"""`tessera` subcommands implemented by the vision stage (each exposes add_arguments and run)."""
