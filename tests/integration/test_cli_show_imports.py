"""``qworker dlq show`` reading a real DLQ imports no more than it needs (issue 15 part 2).

The unit check (``tests/unit/test_cli_imports.py``) stops where the command connects; this one
reads, renders and gives back real dead letters, so imports made on the way are seen too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aio_pika.abc import AbstractConnection

from tests.support.broker import depth
from tests.support.cli import run_python
from tests.support.dlq import letters, make_dlq, publish
from tests.unit.test_cli_imports import NOT_FOR_SHOW, RECORD_MODULES, cli_code

pytestmark = pytest.mark.rabbitmq


async def test_dlq_show_of_a_real_dlq_imports_none_of_the_modules_it_does_not_need(
    broker_url: str,
    queue_name: str,
    cleanup: list[str],
    amqp: AbstractConnection,
    tmp_path: Path,
) -> None:
    """``show --limit 20`` of a DLQ of 30: 20 rows, the DLQ unchanged, and at exit none of
    :data:`~tests.unit.test_cli_imports.NOT_FOR_SHOW` in ``sys.modules``."""
    cleanup.extend(await make_dlq(amqp, queue_name))
    dlq_name = f"{queue_name}.dlq"
    await publish(amqp, dlq_name, letters(queue_name, 30))
    out = tmp_path / "modules.json"
    done = run_python(
        RECORD_MODULES + cli_code("dlq", "show", dlq_name, "--limit", "20", "--url", broker_url),
        env={"MODULES_OUT": str(out)},
    )
    assert done.returncode == 0, done.stderr
    assert sum(f"m{i} " in done.stdout for i in range(30)) == 20, done.stdout
    assert await depth(amqp, dlq_name) == 30
    loaded = set(json.loads(out.read_text()))
    assert sorted(loaded.intersection(NOT_FOR_SHOW)) == []
