#!/usr/bin/env python3
"""htcondor-annex instance agent (stdlib only), written by the boot script with boot.json.

`boot`: IMDSv2 identity; the annex's IDTOKEN from SSM (or the stack strategy's S3 bucket) with
the instance role (SigV4 here: no boto3); token and HTCondor config; start HTCondor. `watch`:
follow the lease (expires tag via IMDS), power off past it, re-fetch the token when it moves;
and every ~5 s look for a spot interruption notice (then the startd takes no new job and
vacates the running ones: see `interrupted`) or a rebalance recommendation.
The token is never logged. Env: ANNEX_IMDS_URL, ANNEX_POWEROFF_CMD; for tests ANNEX_AGENT_ROOT,
ANNEX_AGENT_CONFIG, ANNEX_CONDOR_START_CMD, ANNEX_AGENT_INTERVAL, ANNEX_AGENT_FETCH_TIMEOUT,
ANNEX_AGENT_SPOT_INTERVAL.
"""

import datetime
import hashlib
import hmac
import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

log = logging.getLogger("htcondor-annex-agent")
ROOT = os.environ.get("ANNEX_AGENT_ROOT", "")
CONFIG = os.environ.get("ANNEX_AGENT_CONFIG", ROOT + "/etc/htcondor-annex/boot.json")
TOKEN_FILE = ROOT + "/etc/condor/tokens.d/annex"
CONFIG_FILE = ROOT + "/etc/condor/config.d/50-annex.conf"
EXPIRES_TAG = "htcondor-annex:expires"
# What the startd publishes about a spot notice: the agent writes ClassAd lines here, a startd
# cron job reads them into the slot ads (no reconfig, no HTCondor command authorization).
NOTICE_FILE = "/etc/htcondor-annex/interruption.ad"
INSTANCE_ACTION = "meta-data/spot/instance-action"
REBALANCE = "meta-data/events/recommendations/rebalance"


class AgentError(Exception):
    pass


class Imds:
    """IMDSv2: a session token first, then GETs carrying it."""

    def __init__(self, base=None):
        self.base = base or os.environ.get("ANNEX_IMDS_URL") or "http://169.254.169.254"
        self.base = self.base.rstrip("/")
        self._token = None
        self._token_time = 0.0

    def _session(self):
        if self._token is None or time.time() - self._token_time > 3600:
            request = urllib.request.Request(  # noqa: S310 - http(s) IMDS URL
                self.base + "/latest/api/token",
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"},
            )
            with urllib.request.urlopen(request, timeout=5) as reply:  # noqa: S310
                self._token = reply.read().decode()
            self._token_time = time.time()
        return self._token

    def get(self, path):
        """The text at latest/<path>, or None when IMDS has nothing there (404)."""
        request = urllib.request.Request(  # noqa: S310 - http(s) IMDS URL
            self.base + "/latest/" + path.lstrip("/"),
            headers={"X-aws-ec2-metadata-token": self._session()},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:  # noqa: S310
                return reply.read().decode()
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            if err.code == 401:  # session token expired early: get a new one next time
                self._token = None
            raise

    def credentials(self):
        roles = (self.get("meta-data/iam/security-credentials/") or "").split()
        if not roles:
            raise AgentError("no IAM role on this instance (the setup's instance profile)")
        creds = json.loads(self.get("meta-data/iam/security-credentials/" + roles[0]) or "{}")
        if not creds.get("AccessKeyId"):
            raise AgentError("IMDS returned no credentials for role " + roles[0])
        return creds


def _hmac(key, text):
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def sigv4_headers(url, body, *, region, service, target, creds, now=None):
    """Headers for an AWS JSON-1.1 POST to `url`, signed with Signature Version 4."""
    headers = {"content-type": "application/x-amz-json-1.1", "x-amz-target": target}
    return sigv4_sign(
        "POST", url, body, headers, region=region, service=service, creds=creds, now=now
    )


def sigv4_sign(method, url, body, headers, *, region, service, creds, now=None):
    """`headers` plus host, date, token and the SigV4 authorization for this request (S3 also
    gets x-amz-content-sha256, which it requires). Paths are sent as given: the names used
    here (bucket, key, `/`) need no escaping."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    parts = urllib.parse.urlsplit(url)
    payload = hashlib.sha256(body).hexdigest()
    headers = dict(headers, host=parts.netloc)
    headers["x-amz-date"] = amz_date
    if service == "s3":
        headers["x-amz-content-sha256"] = payload
    if creds.get("Token"):
        headers["x-amz-security-token"] = creds["Token"]
    signed = ";".join(sorted(headers))
    canonical = "\n".join(
        [
            method,
            parts.path or "/",
            parts.query,
            "".join(f"{k}:{headers[k].strip()}\n" for k in sorted(headers)),
            signed,
            payload,
        ]
    )
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = ("AWS4" + creds["SecretAccessKey"]).encode()
    for part in (day, region, service, "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={creds['AccessKeyId']}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}"
    )
    del headers["host"]  # urllib sends the same value itself
    return headers


def ssm_endpoint(endpoint, region):
    url = endpoint or f"https://ssm.{region}.amazonaws.com"
    return url if urllib.parse.urlsplit(url).path else url.rstrip("/") + "/"


def get_parameter(endpoint, region, name, creds):
    """SSM GetParameter WithDecryption: the parameter's plain value."""
    url = ssm_endpoint(endpoint, region)
    body = json.dumps({"Name": name, "WithDecryption": True}).encode()
    headers = sigv4_headers(
        url, body, region=region, service="ssm", target="AmazonSSM.GetParameter", creds=creds
    )
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=20) as reply:  # noqa: S310
            return json.loads(reply.read().decode())["Parameter"]["Value"]
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:300]
        raise AgentError(f"SSM GetParameter {name}: HTTP {err.code}: {detail}") from None


def s3_url(endpoint, region, bucket, key):
    """Path style through a rendered endpoint (an emulator); on AWS the virtual-hosted,
    regional name (path style is being retired there)."""
    if endpoint:
        return f"{endpoint.rstrip('/')}/{bucket}/{key}"
    return f"https://{bucket}.s3.{region}.amazonaws.com/{key}"


def get_s3_object(endpoint, region, bucket, key, creds):
    """S3 GetObject: the object's text."""
    url = s3_url(endpoint, region, bucket, key)
    headers = sigv4_sign("GET", url, b"", {}, region=region, service="s3", creds=creds)
    request = urllib.request.Request(url, headers=headers, method="GET")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=20) as reply:  # noqa: S310
            return reply.read().decode()
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:300]
        raise AgentError(f"S3 GetObject s3://{bucket}/{key}: HTTP {err.code}: {detail}") from None


def write_file(path, text, mode):
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    temp = path + ".tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(temp, mode)
    os.replace(temp, path)


def load_config():
    with open(CONFIG) as src:
        return json.load(src)


def region_of(cfg, imds):
    # The parameter lives where the helper wrote it: the rendered region wins.
    return cfg.get("region") or (imds.get("meta-data/placement/region") or "").strip()


def fetch_token(cfg, imds, deadline_s=None):
    """Fetch the token, retrying while the role or parameter is still propagating."""
    timeout = float(deadline_s or os.environ.get("ANNEX_AGENT_FETCH_TIMEOUT", "600"))
    deadline = time.time() + timeout
    delay = 2.0
    while True:
        try:
            creds = imds.credentials()
            region = region_of(cfg, imds)
            # Our own copy: the role reads only the one tagged with this instance (docs/iam.md).
            mine = "/" + imds.get("meta-data/instance-id").strip()
            url, bucket = cfg["aws_endpoint_url"], cfg.get("token_bucket")
            if bucket:
                return get_s3_object(url, region, bucket, cfg["token_key"] + mine, creds)
            return get_parameter(url, region, cfg["token_parameter"] + mine, creds)
        except (AgentError, OSError, ValueError, KeyError) as err:
            if time.time() + delay > deadline:
                raise AgentError(f"could not fetch the annex token: {err}") from None
            log.warning("token fetch failed (%s); retrying in %.0fs", err, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


def install_token(cfg, imds):
    token = fetch_token(cfg, imds)
    os.makedirs(os.path.dirname(TOKEN_FILE), mode=0o700, exist_ok=True)
    write_file(TOKEN_FILE, token.strip() + "\n", 0o600)
    log.info("wrote the annex token to %s", TOKEN_FILE)


def start_condor():
    custom = os.environ.get("ANNEX_CONDOR_START_CMD")
    if custom:
        command = ["/bin/sh", "-c", custom]
    elif os.path.isdir("/run/systemd/system"):
        command = ["systemctl", "restart", "condor"]
    else:
        command = ["condor_master"]  # daemonizes itself
    log.info("starting HTCondor: %s", " ".join(command))
    subprocess.run(command, check=True)


def boot():
    cfg = load_config()
    imds = Imds()
    instance_id = "unknown"
    for attempt in range(10):  # IMDS can lag the very first seconds of a boot
        try:
            instance_id = (imds.get("meta-data/instance-id") or "unknown").strip()
            break
        except OSError as err:
            log.warning("IMDS not answering yet (%s)", err)
            time.sleep(min(2**attempt, 10))
    log.info("annex %s of %s: instance %s booting", cfg["annex"], cfg["owner"], instance_id)
    install_token(cfg, imds)
    config = cfg["condor_config"] + (
        f'\nAnnexInstanceId = "{instance_id}"\nSTARTD_ATTRS = $(STARTD_ATTRS) AnnexInstanceId\n'
    )
    if not os.path.exists(ROOT + NOTICE_FILE):
        write_file(ROOT + NOTICE_FILE, "", 0o644)
    write_file(CONFIG_FILE, config + interruption_config(), 0o644)
    log.info("wrote %s", CONFIG_FILE)
    start_condor()
    return 0


def interruption_config():
    """Startd config for spot notices. A cron job publishes NOTICE_FILE (empty until a notice)
    1 s after each run; once it carries AnnexInterruption the startd starts no job (START) and
    preempts the running ones at its next policy evaluation (PREEMPT, no retirement time): the
    jobs go back to idle in their schedd, with the usual soft kill first for jobs that
    checkpoint. No benchmarks: 23.9 holds cron jobs while they run (~15 s after boot)."""
    return f"""
# Spot interruption notices (htcondor-annex agent, `watch`).
RUNBENCHMARKS = False
STARTD_CRON_JOBLIST = $(STARTD_CRON_JOBLIST) ANNEXSPOT
STARTD_CRON_ANNEXSPOT_EXECUTABLE = /bin/cat
STARTD_CRON_ANNEXSPOT_ARGS = {NOTICE_FILE}
STARTD_CRON_ANNEXSPOT_MODE = WaitForExit
STARTD_CRON_ANNEXSPOT_PERIOD = 1
START = ($(START)) && (MY.AnnexInterruption =?= undefined)
PREEMPT = ($(PREEMPT:False)) || (MY.AnnexInterruption =!= undefined)
MAXJOBRETIREMENTTIME = ifThenElse(MY.AnnexInterruption =!= undefined, 0, $(MAXJOBRETIREMENTTIME:0))
"""


def notice_lines(action_text, now):
    """The ClassAd lines for NOTICE_FILE from IMDS's instance-action JSON: the notice's time
    as this agent saw it (epoch seconds) and the action when it is one EC2 names."""
    lines = [f"AnnexInterruption = {int(now)}"]
    try:
        action = json.loads(action_text).get("action", "")
    except (ValueError, AttributeError):
        action = ""
    if action in ("terminate", "stop", "hibernate"):
        lines.append(f'AnnexInterruptionAction = "{action}"')
    return "\n".join(lines) + "\n"


def check_spot(imds, state):
    """One look at IMDS's spot notices; `state` remembers what was already acted on."""
    if not state.get("interrupted"):
        try:
            action = imds.get(INSTANCE_ACTION)
        except (OSError, ValueError) as err:
            log.debug("cannot read %s: %s", INSTANCE_ACTION, err)
            action = None
        if action:
            now = time.time()
            log.warning("spot interruption notice (%s): no new jobs, vacating", action.strip())
            write_file(ROOT + NOTICE_FILE, notice_lines(action, now), 0o644)
            state["interrupted"] = now
    if not state.get("rebalance"):
        try:
            hint = imds.get(REBALANCE)
        except (OSError, ValueError):
            hint = None
        if hint:
            # A recommendation only: jobs keep running; the notice, if it comes, acts.
            log.warning("rebalance recommendation: %s", hint.strip())
            state["rebalance"] = time.time()


def read_expiry(imds, fallback):
    try:
        value = imds.get("meta-data/tags/instance/" + EXPIRES_TAG)
    except (OSError, ValueError) as err:
        log.warning("cannot read the expiry tag from IMDS (%s); using %s", err, fallback)
        return fallback
    try:
        return int(value.strip()) if value else fallback
    except ValueError:
        return fallback


def watch():
    cfg = load_config()
    imds = Imds()
    known = int(cfg["expires"])
    interval = float(os.environ.get("ANNEX_AGENT_INTERVAL", "45"))
    spot_every = float(os.environ.get("ANNEX_AGENT_SPOT_INTERVAL", "5"))
    log.info("watching the lease: expires at %d; spot notices every %.0f s", known, spot_every)
    spot = {}
    next_lease = 0.0
    while True:
        if time.time() >= next_lease:
            expires = read_expiry(imds, known)
            if expires > known:
                log.info("lease extended to %d: refreshing the token", expires)
                try:
                    install_token(cfg, imds)
                    known = expires
                except (AgentError, OSError) as err:
                    log.error("token refresh failed: %s", err)
            now = time.time()
            if now >= expires:
                command = os.environ.get("ANNEX_POWEROFF_CMD") or "poweroff"
                log.info("lease ended at %d: running %s", expires, command)
                if subprocess.run(["/bin/sh", "-c", command], check=False).returncode == 0:
                    return 0
            next_lease = now + max(1.0, min(interval, expires - now if expires > now else interval))
        check_spot(imds, spot)
        time.sleep(max(0.2, min(spot_every, next_lease - time.time())))


def main(argv=None):
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s htcondor-annex-agent %(levelname)s %(message)s"
    )
    args = sys.argv[1:] if argv is None else argv
    verb = args[0] if args else "boot"
    try:
        if verb == "boot":
            return boot()
        if verb == "watch":
            return watch()
        if verb == "fetch-token":
            cfg = load_config()
            install_token(cfg, Imds())
            return 0
    except (AgentError, OSError, subprocess.CalledProcessError) as err:
        log.error("%s failed: %s", verb, err)
        return 1
    log.error("unknown verb %r: use boot, watch or fetch-token", verb)
    return 2


if __name__ == "__main__":
    sys.exit(main())
