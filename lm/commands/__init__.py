"""Command-line subcommands of the language-model stage."""
