"""schemathesis against the running server's own OpenAPI schema: whatever it sends, never a 500.

Every operation of /openapi.json gets a bounded number of generated requests (valid and invalid
bodies, paths and parameters, with the API key). A 4xx is a correct answer to a bad request; the
only 5xx allowed is a 504 from the per-request timeout (generated settings may ask for long work).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from test_server import KEY, start_server, stop

EXAMPLES_PER_OPERATION = 12
AUTH = {"Authorization": f"Bearer {KEY}"}
responses: dict[int, int] = {}  # status -> count, printed at the end


@pytest.fixture(scope="module")
def server_url(tiny_checkpoint, tmp_path_factory):
    proc, url = start_server(tiny_checkpoint, tmp_path_factory.mktemp("db") / "sessions.sqlite3",
                             "--max-body-mb", "1", "--timeout", "20")
    yield url
    stop(proc)
    print(f"\nfuzz: {sum(responses.values())} requests, statuses {dict(sorted(responses.items()))}")


@pytest.fixture(scope="module")
def api_schema(server_url):
    return schemathesis.openapi.from_url(f"{server_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
def test_no_server_errors(case, server_url):
    response = case.call(base_url=server_url, headers=AUTH, timeout=60)
    responses[response.status_code] = responses.get(response.status_code, 0) + 1
    if response.status_code >= 500:
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout", (
            f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:500]}")
    if response.status_code >= 400:  # every error is an OpenAI error object
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text[:500]
