"""``omnigen2 serve``: one loaded pipeline served through OpenAI's API (docs/SERVING.md).

- :mod:`.config`   limits and settings (``ServeConfig``, ``Limits``)
- :mod:`.schemas`  request bodies (pydantic)
- :mod:`.errors`   OpenAI's error object and the status of each failure
- :mod:`.queue`    the bounded FIFO queue in front of the one model worker thread
- :mod:`.engine`   the library calls a request turns into (on the worker thread)
- :mod:`.codec`    image uploads and data URLs in, PNGs out
- :mod:`.metrics`  Prometheus metrics
- :mod:`.app`      the FastAPI app: routes, middleware (auth, body limit, metrics), streaming
- :mod:`.server`   uvicorn with SIGTERM as a drain
- :mod:`.cli`      the ``serve`` subcommand

Only :mod:`.cli` and :mod:`.config` import without the ``serve`` extra (fastapi, uvicorn, python-multipart,
prometheus-client).
"""
