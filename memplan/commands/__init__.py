"""memplan subcommands; each module registers itself with memplan.cli.command."""
