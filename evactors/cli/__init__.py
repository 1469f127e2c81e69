"""Layer 6, the command line: argument parsing and the commands (``bin/evactors``)."""
