"""schemathesis against the server's own OpenAPI schema: whatever it sends, never a 500.

The app (with its model thread, queue, limits and sessions database) is served in process over ASGI,
so no port or startup wait is involved. Every operation of /openapi.json gets a bounded number of
generated requests (valid and invalid bodies, paths and parameters, with the API key). A 4xx is a
correct answer to a bad request; the only 5xx allowed is a 504 from the per-request timeout
(generated settings may ask for long work).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

EXAMPLES_PER_OPERATION = 12
KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def api_schema(tiny_pipeline, tmp_path_factory):
    from openbagel.serve.server import create_app

    app = create_app(tiny_pipeline, api_key=KEY, sessions_db=tmp_path_factory.mktemp("db") / "sessions.sqlite3",
                     max_body_bytes=2**20, timeout_s=20)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def check(case) -> int:
    response = case.call(headers=AUTH)
    status = response.status_code
    if status >= 500:
        assert status == 504 and response.json()["error"]["code"] == "timeout", (
            f"{case.method} {case.formatted_path}: {status} {response.text[:500]}")
    if status >= 400:  # every error is an OpenAI error object
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text[:500]
    return status


def test_no_server_errors(api_schema):
    statuses: dict[int, int] = {}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case) -> None:
            status = check(case)
            statuses[status] = statuses.get(status, 0) + 1

        fuzz()
    print(f"\nfuzz: {len(operations)} operations, {sum(statuses.values())} requests, "
          f"statuses {dict(sorted(statuses.items()))}")
    assert len(operations) >= 9
