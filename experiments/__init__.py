"""Research diagnostics and lab tools outside the installed package (README.md); each runs as a script."""
