"""The public names of the contract (docs/contract.md), in one place.

Stdlib only: the hooks import this module.
"""

from __future__ import annotations

# EC2 tags on everything an annex creates.
TAG_NAME = "htcondor-annex:name"
TAG_OWNER = "htcondor-annex:owner"
TAG_REQUEST = "htcondor-annex:request"
TAG_EXPIRES = "htcondor-annex:expires"
TAG_POOL = "htcondor-annex:pool"
TAG_PREFIX = "htcondor-annex:"

# Collector ad.
ANNEX_MYTYPE = "Annex"

# Annex lifecycle states, as published in AnnexState (collector and job ads).
REQUESTED = "requested"
PROVISIONING = "provisioning"
RUNNING = "running"
RETIRING = "retiring"
RETIRED = "retired"
FAILED = "failed"
STATES = (REQUESTED, PROVISIONING, RUNNING, RETIRING, RETIRED, FAILED)

MODES = ("pool", "provision")
STRATEGIES = ("fleet", "stack")

# Canonical job attributes, after the schedd transform has folded every spelling into these.
JOB_TARGET = "TargetAnnexName"
JOB_ATTRS = {
    "instances": "AnnexInstances",
    "instance_types": "AnnexInstanceTypes",
    "image_ids": "AnnexImageIds",
    "spot_prices": "AnnexSpotPrices",
    "lease": "AnnexLease",
    "expiry": "AnnexExpiry",
    "idle_timeout": "AnnexIdleTimeout",
    "region": "AnnexRegion",
    "vpc": "AnnexVpc",
    "subnets": "AnnexSubnets",
    "keypair": "AnnexKeypair",
    "security_groups": "AnnexSecurityGroups",
    "mode": "AnnexMode",
    "central_manager": "AnnexCentralManager",
    "user_data_file": "AnnexUserDataFile",
    "user_data_template": "AnnexUserDataTemplate",
    "tags": "AnnexTags",
    "strategy": "AnnexStrategy",
    "stack_name": "AnnexStackName",
    # Cost (issue 16): the most this annex may spend, in the pool's currency.
    "max_cost": "AnnexMaxCost",
}

# Job attributes the system sets while a job waits for its annex.
JOB_STATUS_ATTRS = (
    "AnnexState",
    "AnnexRequestedInstances",
    "AnnexRunningInstances",
    "AnnexLeaseExpiration",
    "AnnexLastError",
)
# AnnexState of a job whose request the helper refused (a cap, a conflict, a retiring annex, a
# value it does not accept): never an annex's state. The job stays idle, AnnexLastError says
# why, and the job router asks again every polling period (docs/troubleshooting.md).
JOB_REFUSED = "refused"
# ... and what it has cost so far (controllers/status.py; absent while a price is missing).
JOB_COST_ATTR = "AnnexCostSoFar"
# ... and, in provision mode, while the job stands for its annex (docs/users.md).
JOB_PROVISION_ATTRS = (
    "AnnexId",
    "AnnexInstanceIds",
    "AnnexInstanceStates",
    "AnnexPendingInstances",
    "AnnexFailedInstances",
    "AnnexRetireReason",
)

# Provision mode: EC2 takes at most 16 KB of user data (before its base64 encoding); larger
# files are sent gzip-compressed when that fits (cloud-init and our booter unpack it).
USER_DATA_LIMIT = 16 * 1024
# How a provision-mode job (annex_provision_job) ends: its exit code says which.
EXIT_ENDED = 0  # every instance ended by itself (the pilots finished)
EXIT_ERROR = 1  # the program itself failed
EXIT_LEASE = 2  # the lease ended: the instances were terminated
EXIT_LAUNCH_FAILED = 3  # no instance could be launched
EXIT_DELETED = 4  # someone deleted the annex (htcondor-annex delete)
EXIT_IDLE = 5  # retired for another reason (e.g. no job stood for it)

# Where the hooks and the CLI find the helper when nothing else says: HTCondor's default
# $(RUN) on Debian and RPM installs. ANNEX_GAHP_SOCKET in the environment, or AnnexGahpSocket
# in the ad the hook is given, take precedence.
DEFAULT_SOCKET = "/var/run/condor/annex_gahp.sock"
SOCKET_ENV = "ANNEX_GAHP_SOCKET"
SOCKET_ATTR = "AnnexGahpSocket"

# Annex names: what an EC2 tag, a ClassAd string and a CloudFormation stack name all accept.
NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9-]{0,62}$"
NAME_MAX = 63

# ---- limits on what a user may ask for (spec.py and 20-annex-submit.conf enforce them) ----
# AWS's own tag limits (EC2, Auto Scaling, CloudFormation): 50 tags per resource, keys of at
# most 128 and values of at most 256 characters, and only letters, digits, spaces and
# _ . : / = + - @ everywhere (EC2 alone is laxer). Ours (name, owner, request, expires, pool,
# the launch template's digest) go on the same resources: a few are kept for them.
TAG_LIMIT = 50
TAGS_KEPT_FOR_US = 8
USER_TAGS_MAX = TAG_LIMIT - TAGS_KEPT_FOR_US
TAG_KEY_MAX = 128
TAG_VALUE_MAX = 256
TAG_KEY_CHARS = r"[A-Za-z0-9 _.:/+@-]"
TAG_VALUE_CHARS = r"[A-Za-z0-9 _.:/=+@-]"
# Free text (bytes, UTF-8): a name, id or host name (AWS's key pair and security group names
# stop at 255), a comma list of them, a path.
TEXT_MAX = 255
LIST_TEXT_MAX = 2048
PATH_TEXT_MAX = 4096
TAGS_TEXT_MAX = 16384
# Whole numbers as text: at most this many digits (int64 holds 18 for certain; Python's
# int() refuses more than 4300, with a message of its own).
NUMBER_DIGITS_MAX = 18
