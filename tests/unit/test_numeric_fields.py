"""Numeric request fields the helper reads itself are bounded (issue #12): a huge number is a
refusal naming the field, never INTERNAL (SQLite refuses ints past 2**63; int() past 4300
digits)."""

from __future__ import annotations

import pytest
from aws_fixtures import make_settings

from annex_gahp.errors import InputError
from annex_gahp.gahp import Caller
from annex_gahp.service import AnnexService
from annex_gahp.store import Store

ALICE = Caller(uid=1000, user="alice", is_admin=False)


@pytest.mark.parametrize("value", ["9" * 19, "9" * 30, "9" * 5000, "١٢", "-1", "1e3"])
def test_huge_or_odd_annex_ids_are_refused_naming_the_field(tmp_path, value) -> None:
    service = AnnexService(
        Store(str(tmp_path / "s.sqlite")), make_settings(), resolve_region=lambda r, s: "us-east-1"
    )
    with pytest.raises(InputError, match=r"^id= must be a whole number$"):
        service.status(ALICE, {"id": value})
