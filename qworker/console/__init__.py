"""The failed-message console: pages and a JSON API over :mod:`qworker.dlq`.

``qworker console [APP]`` runs it (its own process, never inside a worker); it needs
the ``console`` extra (``pip install 'qworker[console]'``). The modules:

- :mod:`~qworker.console.service`: :class:`Console`, the one place that calls the DLQ
  library (scan cache, one pass per DLQ at a time, jobs).
- :mod:`~qworker.console.jobs`: replays and purges that outlive a request.
- :mod:`~qworker.console.broker`: the console's connection, with back-off.
- :mod:`~qworker.console.security`: token, sessions, CSRF, security headers.
- :mod:`~qworker.console.api`, :mod:`~qworker.console.openapi`: the JSON API.
- :mod:`~qworker.console.pages` (+ ``templates/``, ``static/``): the pages.
- :mod:`~qworker.console.web`: the ASGI application; :mod:`~qworker.console.paths`:
  queue names with ``/`` in URLs.
- :mod:`~qworker.console.errors`: what can go wrong, with HTTP statuses.
"""
