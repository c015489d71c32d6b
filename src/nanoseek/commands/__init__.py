"""One module per `nanoseek` subcommand; see nanoseek/cli.py."""
