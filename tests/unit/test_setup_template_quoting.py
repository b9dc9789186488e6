"""templates/setup-stack.json.j2 puts every value through tojson (issue #12): a pool id with
quotes, backslashes or newlines renders valid JSON in which it reads back unchanged."""

from __future__ import annotations

import json

import pytest
from aws_fixtures import make_settings

from annex_gahp.cloud.aws import setup

HOSTILE = [
    'ap"1',
    'ap", "Evil": "x',
    "ap\nline2",
    "ap\\",
    "ap\\\"}]}",
    "ap{{ 7*7 }}",
    "ap\u2028x\u0000",
]


def strings(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in (*strings(key), *strings(value))]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return []


@pytest.mark.parametrize("pool_id", HOSTILE)
def test_hostile_pool_ids_render_valid_json_and_round_trip(pool_id: str) -> None:
    body = json.loads(setup.render_template(make_settings(pool_id=pool_id), "annex-setup"))
    assert body["Description"].startswith(f"htcondor-annex setup for pool {pool_id}: ")
    resources = body["Resources"]
    assert "Evil" not in json.dumps(list(body))
    found = strings(body)
    assert f"htcondor-annex instances of pool {pool_id}: read their IDTOKEN" in found
    assert f"htcondor-annex lease enforcer of pool {pool_id}" in found
    variables = [
        r["Properties"]["Environment"]["Variables"]
        for r in resources.values()
        if "Environment" in r.get("Properties", {})
    ]
    assert variables and all(v["ANNEX_POOL_ID"] == pool_id for v in variables)
