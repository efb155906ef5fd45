"""Finding DLQs through the RabbitMQ management API (``qworker dlq ls --management-url``).

One GET of ``/api/queues/<vhost>?columns=name``; every queue whose name ends
in ``.dlq`` is a DLQ by qworker's naming. Standard library only.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from qworker.errors import ManagementError
from qworker.redact import mask_url
from qworker.topology import DLQ_SUFFIX


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


#: Seconds to wait for the management API when probing a queue's delivery limit.
PROBE_TIMEOUT = 3.0
#: The port of the management API when only the AMQP URL is known.
DEFAULT_MANAGEMENT_PORT = 15672
#: RabbitMQ 4.x gives a quorum queue without any delivery limit this one.
DEFAULT_QUORUM_LIMIT_4X = 20


def _get_json(url: str, auth: str | None, management_url: str, timeout: float) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": auth} if auth else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read(16 * 1024 * 1024))
    except urllib.error.HTTPError as exc:
        raise ManagementError(
            f"management API at {mask_url(management_url)}: HTTP {exc.code}"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ManagementError(f"management API at {mask_url(management_url)}: {reason}") from None


def queue_info(management_url: str, vhost: str, name: str, timeout: float = PROBE_TIMEOUT) -> Any:
    """``GET /api/queues/<vhost>/<name>``: the queue's type, arguments and effective policy."""
    base, auth = queues_url(management_url, vhost)
    url = base.split("?", 1)[0] + "/" + urllib.parse.quote(name, safe="")
    info = _get_json(url, auth, management_url, timeout)
    if not isinstance(info, dict):
        raise ManagementError("the management API did not answer with a queue object")
    return info


def broker_major(management_url: str, timeout: float = PROBE_TIMEOUT) -> int | None:
    """The major version of the broker (``/api/overview``), or None if unreadable."""
    base, auth = queues_url(management_url, "/")
    url = base.split("/api/queues/", 1)[0] + "/api/overview"
    try:
        overview = _get_json(url, auth, management_url, timeout)
        return int(str(overview.get("rabbitmq_version", "")).split(".", 1)[0])
    except (ManagementError, ValueError, AttributeError):
        return None


def _as_limit(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    try:
        limit = int(value)
    except ValueError:
        return None
    return limit if limit >= 0 else None


def effective_delivery_limit(info: Any, major: int | None = None) -> int | None:
    """The delivery limit the broker applies to a queue described by ``/api/queues``.

    The lower of the policy's ``delivery-limit`` (``effective_policy_definition``,
    operator policies merged in) and the ``x-delivery-limit`` argument; None for a
    queue that counts no deliveries (classic, stream) or has no limit. A quorum
    queue without any limit gets RabbitMQ 4.x's default of 20 when ``major`` >= 4.
    """
    if not isinstance(info, dict) or info.get("type") != "quorum":
        return None
    limits: list[int] = []
    arguments = info.get("arguments")
    if isinstance(arguments, dict):
        limit = _as_limit(arguments.get("x-delivery-limit"))
        if limit is not None:
            limits.append(limit)
    for key in ("effective_policy_definition", "operator_policy_definition"):
        definition = info.get(key)
        if isinstance(definition, dict):
            limit = _as_limit(definition.get("delivery-limit"))
            if limit is not None:
                limits.append(limit)
    if limits:
        return min(limits)
    return DEFAULT_QUORUM_LIMIT_4X if major is not None and major >= 4 else None


def management_url_for(amqp_url: str) -> str:
    """The management API URL a broker URL suggests: same host and credentials, port 15672."""
    parts = urllib.parse.urlsplit(amqp_url)
    scheme = "https" if parts.scheme == "amqps" else "http"
    userinfo = ""
    if parts.username is not None:
        userinfo = parts.username + (f":{parts.password}" if parts.password is not None else "")
        userinfo += "@"
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{userinfo}{host}:{DEFAULT_MANAGEMENT_PORT}/"


def policies(management_url: str, vhost: str, kind: str = "policies") -> list[Any]:
    """``GET /api/<kind>/<vhost>`` (``policies`` or ``operator-policies``): a list of policies."""
    base, auth = queues_url(management_url, vhost)
    url = base.split("?", 1)[0].replace("/api/queues/", f"/api/{kind}/", 1)
    answer = _get_json(url, auth, management_url, PROBE_TIMEOUT)
    if not isinstance(answer, list):
        raise ManagementError(f"the management API did not answer with a list of {kind}")
    return answer


def policy_delivery_limit(policies: Any, name: str, queue_type: str = "quorum") -> int | None:
    """The ``delivery-limit`` that the matching policy of the list gives queue ``name``.

    Read from the policies themselves (the queue's own ``effective_policy_definition``
    is refreshed by the statistics collector, seconds after a policy changes). The
    policy of highest priority whose ``apply-to`` covers the queue and whose pattern
    matches wins; among several of that priority, the lowest limit is taken.
    """
    matching: list[tuple[int, int | None]] = []
    for policy in policies if isinstance(policies, list) else []:
        if not isinstance(policy, dict):
            continue
        applies = policy.get("apply-to", "all")
        if applies not in ("all", "queues", f"{queue_type}_queues"):
            continue
        pattern = policy.get("pattern")
        try:
            if not isinstance(pattern, str) or re.search(pattern, name) is None:
                continue
        except re.error:
            continue  # an Erlang pattern Python cannot read: the queue's own view decides
        priority = policy.get("priority", 0)
        definition = policy.get("definition")
        limit = (
            _as_limit(definition.get("delivery-limit")) if isinstance(definition, dict) else None
        )
        matching.append((priority if isinstance(priority, int) else 0, limit))
    if not matching:
        return None
    top = max(priority for priority, _ in matching)
    limits = [limit for priority, limit in matching if priority == top and limit is not None]
    return min(limits) if limits else None
