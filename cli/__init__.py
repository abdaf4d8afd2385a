"""The `clipcoco` command-line tool: thin typer wrappers over the library functions."""
