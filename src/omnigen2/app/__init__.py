"""``omnigen2 app``: a Gradio page over the library's pipelines (docs/APP.md).

``session.py`` is the model side (the pipelines, called as a user would, and the PNGs ``omnigen2 generate``
writes); ``ui.py`` builds the page on it; ``cli.py`` declares the command. Only ``cli.py`` is imported by
``omnigen2 --help``: gradio and torch load when the command runs.
"""
