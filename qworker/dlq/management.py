"""Finding DLQs through the RabbitMQ management API (``qworker dlq ls --management-url``).

One GET of ``/api/queues/<vhost>?columns=name``; every queue whose name ends
in ``.dlq`` is a DLQ by qworker's naming. Standard library only.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from qworker.errors import QworkerError
from qworker.redact import mask_url

DLQ_SUFFIX = ".dlq"


class ManagementError(QworkerError):
    """The management API could not be asked, or answered something unexpected."""


def dlq_names(queues: Any) -> list[str]:
    """The DLQ names in a ``/api/queues`` answer (a list of objects with ``name``), sorted."""
    if not isinstance(queues, list):
        raise ManagementError("the management API did not answer with a list of queues")
    names = {q.get("name") for q in queues if isinstance(q, dict)}
    return sorted(n for n in names if isinstance(n, str) and n.endswith(DLQ_SUFFIX))


def queues_url(management_url: str, vhost: str) -> tuple[str, str | None]:
    """The ``/api/queues/<vhost>`` URL (credentials removed) and its Basic auth header."""
    parts = urllib.parse.urlsplit(management_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ManagementError(f"not an http(s) URL: {mask_url(management_url)}")
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    path = parts.path.rstrip("/") + "/api/queues/" + urllib.parse.quote(vhost, safe="")
    url = urllib.parse.urlunsplit((parts.scheme, netloc, path, "columns=name", ""))
    auth = None
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return url, auth


def list_dlqs(management_url: str, vhost: str = "/", timeout: float = 10.0) -> list[str]:
    """Every ``*.dlq`` queue of ``vhost`` that the management API lists."""
    url, auth = queues_url(management_url, vhost)
    request = urllib.request.Request(url, headers={"Authorization": auth} if auth else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read(16 * 1024 * 1024))
    except urllib.error.HTTPError as exc:
        raise ManagementError(
            f"management API at {mask_url(management_url)}: HTTP {exc.code}"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ManagementError(f"management API at {mask_url(management_url)}: {reason}") from None
    return dlq_names(payload)
