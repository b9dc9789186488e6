"""condor_config.d/20-annex-submit.conf is rendered from annex_gahp/spec.py, never edited by hand.

The shipped file must be exactly what `htcondor-annex render-submit-config` prints; the
rendering must carry every rule of spec.RULES, in order, with the comment an admin reads; and
the Python messages of spec must be the ones condor_submit prints (checked for the rules whose
reason is a plain string, and for the generated per-keyword rules).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from annex_gahp import names, settings, spec, submitconfig
from annex_gahp.errors import InputError, LimitExceeded

TOP = Path(__file__).resolve().parents[2]


def test_shipped_submit_config_is_the_rendering() -> None:
    shipped = submitconfig.SHIPPED.read_text(encoding="utf-8")
    assert shipped == submitconfig.render(), (
        f"{submitconfig.SHIPPED} differs from the rules in annex_gahp/spec.py:"
        f" run `{submitconfig.COMMAND}` and commit the result"
    )


def test_command_writes_the_rendering(tmp_path, capsys) -> None:
    out = tmp_path / "20-annex-submit.conf"
    # In a process of its own: importing cli_admin here would hide that module's absence from
    # test_cli's test of the CLI without it.
    verb = ["-m", "annex_gahp.cli", "render-submit-config", "--output", str(out)]
    subprocess.run([sys.executable, *verb], check=True, cwd=TOP, timeout=60)
    assert out.read_text(encoding="utf-8") == submitconfig.render()
    assert submitconfig.main([]) == 0
    assert capsys.readouterr().out == submitconfig.render()


def test_every_rule_is_listed_in_order_with_its_comment() -> None:
    text = submitconfig.render()
    listed = re.search(r"^SUBMIT_REQUIREMENT_NAMES = \$\(SUBMIT_REQUIREMENT_NAMES\) (.*?)\n\n",
                       text, re.S | re.M)  # fmt: skip
    assert listed is not None
    order = listed.group(1).replace("\\\n", " ").split()
    assert order == [rule.name for rule in spec.RULES]
    assert len(set(order)) == len(order)
    for rule in spec.RULES:
        assert rule.why, f"{rule.name} has no description for the admin"
        block = text[text.index(f"\nSUBMIT_REQUIREMENT_{rule.name} ") :]
        assert f"SUBMIT_REQUIREMENT_{rule.name}_REASON" in block
        comment = text[: text.index(f"\nSUBMIT_REQUIREMENT_{rule.name} ")].rsplit("\n\n", 1)[1]
        assert " ".join(rule.why.split()[:3]) in comment.replace("\n# ", " ")


def test_every_keyword_is_declared_copied_and_converted() -> None:
    text = submitconfig.render()
    for key, attr in names.JOB_ATTRS.items():
        assert re.search(rf'^  annex_{key} = "(string|filename)"$', text, re.M), key
        assert f"COPY annex_{key} {attr}\n" in text
        assert f"  # annex_{key}" in text
        assert f"_annex_a = {attr}\n" in text


@pytest.mark.parametrize("key", spec.TEXT_KEYS)
def test_generated_text_rules_say_what_spec_says(key: str) -> None:
    text = submitconfig.render()
    config = settings.load(lookup={}.get)
    start = "/" if key == "user_data_file" else ""
    with pytest.raises(InputError) as control:
        spec.from_keywords({"name": "a", key: start + "x\x01y"}, "alice", config)
    assert f'"{control.value}"' in text
    limit = spec.TEXT_LIMITS.get(key, names.TEXT_MAX)
    with pytest.raises(InputError) as long:
        too_long = start + "x" * (limit + 1 - len(start))
        spec.from_keywords({"name": "a", key: too_long}, "alice", config)
    assert f'"{long.value}"' in text
    assert f"size({names.JOB_ATTRS[key]}) > {limit}," in text


def test_no_comment_after_a_value() -> None:
    # HTCondor reads `KNOB = value # note` as part of the value (tests/unit/test_docs_traps.py).
    for number, line in enumerate(submitconfig.render().splitlines(), 1):
        assert not re.match(r"^\s*[^#\s].*?\s#", line), (number, line)



# ---- the table's ClassAd and spec's Python refuse the same jobs with the same message -------

_MACROS = {
    "$(ANNEX_MAX_INSTANCES)": "50",
    "$(ANNEX_SUBMIT_MAX_LEASE)": "86400",
    "$(ANNEX_SUBMIT_ALLOWED_TYPES)": '""',
    "$(ANNEX_SUBMIT_ALLOWED_IMAGES)": '""',
    "$(ANNEX_SUBMIT_ALLOWED_REGIONS)": '"us-east-1"',
    "$(ANNEX_SUBMIT_TYPE_COUNT)": 'ifThenElse(AnnexInstanceTypes isnt undefined,'
    ' size(split(AnnexInstanceTypes, ",")), size(split("m5.large", ",")))',
    "$(ANNEX_SUBMIT_BUDGET_PER_USER)": '"500 USD/30d"',
    "$(_annex_price)": r"([0-9]{1,6}(\\.[0-9]{0,8})?|\\.[0-9]{1,8})",
}
_CONFIG = {
    "ANNEX_ALLOWED_REGIONS": "us-east-1",
    "ANNEX_MAX_INSTANCES": "50",
    "ANNEX_BUDGET_PER_USER": "500 USD/30d",
}


def _expand(expr: str) -> str:
    for macro, value in _MACROS.items():
        expr = expr.replace(macro, value)
    assert "$(" not in expr, expr
    return expr


# Jobs as the transform leaves them (canonical attributes, converted where it could).
_REFUSED = [
    {"AnnexInstances": 0}, {"AnnexInstances": "lots"}, {"AnnexInstances": 51},
    {"AnnexLease": 60, "AnnexExpiry": 4102444800}, {"AnnexLease": "1 h"}, {"AnnexLease": 0},
    {"AnnexLease": 90000}, {"AnnexExpiry": "tomorrow"}, {"AnnexExpiry": 1000},
    {"AnnexExpiry": 4102444800}, {"AnnexIdleTimeout": "soon"}, {"AnnexMode": "cloud"},
    {"AnnexStrategy": "asg"}, {"AnnexMode": "provision"},
    {"AnnexMode": "provision", "AnnexUserDataFile": "/u", "AnnexCentralManager": "cm"},
    {"AnnexMode": "provision", "AnnexUserDataFile": "/u", "AnnexIdleTimeout": 60},
    {"AnnexUserDataFile": "/u"}, {"AnnexUserDataTemplate": "maybe"},
    {"AnnexUserDataTemplate": True}, {"AnnexStackName": "st"},
    {"AnnexStrategy": "stack", "AnnexStackName": "1st"},
    {"AnnexStrategy": "stack", "AnnexVpc": "vpc-1"}, {"AnnexImageIds": "ami-1,ami-2"},
    {"AnnexSpotPrices": "0.1,0.2"}, {"AnnexSpotPrices": "0.0"}, {"AnnexSpotPrices": "1e3"},
    {"AnnexRegion": "eu-west-1"}, {"AnnexTags": "novalue"}, {"AnnexTags": "aws:x=1"},
    {"AnnexTags": ",".join(f"k{i}=v" for i in range(43))}, {"AnnexTags": "k" * 129 + "=v"},
    {"AnnexTags": "k=v!"}, {"AnnexVpc": "a\tb"}, {"AnnexKeypair": "k" * 256},
    {"TargetAnnexName": "-x"}, {"TargetAnnexName": "a_b"},
    {"AnnexImageIds": "resolve:ssm:aws/service/x"}, {"AnnexImageIds": "resolve:x"},
    {"AnnexImageIds": "resolve:ssm:/aws/service/a/../b"},
    {"AnnexImageIds": "resolve:ssm:/aws/service//b"},
    {"AnnexImageIds": "resolve:ssm:/aws/service/a$b"},
    {"AnnexMaxCost": "0"}, {"AnnexMaxCost": "ten"}, {"AnnexMaxCost": "-5"},
    {"AnnexMaxCost": "500.01"},
]  # fmt: skip


def _case_id(attrs: dict[str, object]) -> str:
    return ",".join(f"{k}={v!s:.20}" for k, v in attrs.items())


@pytest.mark.parametrize("attrs", _REFUSED, ids=_case_id)
def test_the_rule_table_and_spec_refuse_alike(attrs: dict[str, object]) -> None:
    pytest.importorskip("htcondor2")  # registers HTCondor's functions: split, stringList*
    classad2 = pytest.importorskip("classad2")
    job = {"TargetAnnexName": "a1", "AnnexInstances": 1, "AnnexMode": "pool",
           "AnnexStrategy": "fleet", **attrs}  # fmt: skip
    ad = classad2.ClassAd(job)
    failed = [
        rule for rule in spec.RULES
        if classad2.ExprTree(_expand(f"{rule.guard} || {rule.accept}")).eval(ad) is not True
    ]  # fmt: skip
    assert failed, f"no rule refuses {attrs}"
    said = classad2.ExprTree(_expand(failed[0].reason)).eval(ad)
    config = settings.load(lookup=_CONFIG.get)
    with pytest.raises((InputError, LimitExceeded)) as err:
        spec.from_job_attrs(job, "alice", config)
    assert str(err.value) == said, failed[0].name


def test_the_rule_table_accepts_a_good_job() -> None:
    pytest.importorskip("htcondor2")
    classad2 = pytest.importorskip("classad2")
    job = {"TargetAnnexName": "a1", "AnnexInstances": 2, "AnnexMode": "pool",
           "AnnexStrategy": "stack", "AnnexStackName": "st", "AnnexLease": 3600,
           "AnnexInstanceTypes": "m5.large,c5.large", "AnnexSpotPrices": "0.1,0.2",
           "AnnexRegion": "us-east-1", "AnnexTags": "team=hep,cost center=42",
           "AnnexImageIds": "resolve:ssm:/aws/service/debian/13/latest/amd64",
           "AnnexMaxCost": "500"}  # fmt: skip
    ad = classad2.ClassAd(job)
    for rule in spec.RULES:
        assert classad2.ExprTree(_expand(f"{rule.guard} || {rule.accept}")).eval(ad) is True, rule
    spec.from_job_attrs(job, "alice", settings.load(lookup=_CONFIG.get))
