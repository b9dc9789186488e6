"""Benchmark 4: the helper's socket throughput, and its memory with 1,000 annexes.

Throughput: ANNEX_STATUS and ANNEX_LIST (half each) from several client processes as alice
against the running helper, for a fixed time, two ways:
  - one request per connection, through the project's own client (`client.call`: what the
    command line and the hooks do: banner, ASYNC_MODE_ON, command, RESULTS);
  - one connection per client process, requests pipelined in batches (what a GAHP client such
    as the gridmanager does).
Target: >= 1,000 requests per second.

Memory: a second helper (same program, `annex_gahp --daemon`, its own scratch state dir,
socket, log and pool id, its own listener on the counting proxy) is started on an empty store
while the emulator holds 1,000 instances tagged as 1,000 annexes of 10 owners (launched here
directly in the emulator, one RunInstances each, not counted). The helper adopts them from
their tags (the path it takes after losing its state file), so its store holds 1,000 annexes
and every cycle observes 1,000 instances. After 3 reconcile cycles: VmRSS and VmHWM of that
helper. Target: RSS <= 100 MB. Then the same throughput test against it (admin, ANNEX_STATUS
of one annex; ANNEX_LIST there returns all 1,000 annexes and is reported separately).
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

BENCH = "socket"
USER = "alice"
ANNEX = "sockbench"
CLIENTS = 4
SECONDS = 4.0
BATCH = 20
FILL = 1000
FILL_OWNERS = 10
SINGLES = 150  # of the FILL instances, in reservations of their own
FILL_POOL = "bench-fill"
FILL_DIR = f"{common.BENCH_DIR}/fill"
HELPER = "/opt/annex-venv/bin/annex_gahp"


# --- clients ------------------------------------------------------------------------------


def _per_connection(path: str, commands: list[tuple[str, dict]], stop_at: float, q) -> None:
    from annex_gahp import client  # noqa: PLC0415

    time.sleep(max(0.0, stop_at - SECONDS - time.time()))
    done = errors = 0
    while time.time() < stop_at:
        command, kwargs = commands[done % len(commands)]
        try:
            client.call(command, path=path, **kwargs)
        except client.ClientError:
            errors += 1
        done += 1
    q.send((done, errors))


class _Session:
    """One GAHP conversation: banner, ASYNC_MODE_ON, then pipelined commands + RESULTS."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        self.readline()  # banner
        self.send(["ASYNC_MODE_ON"])
        self.readline()

    def send(self, args: list[str]) -> None:
        self.file.write((" ".join(args) + "\r\n").encode())
        self.file.flush()

    def readline(self) -> str:
        line = self.file.readline()
        if not line:
            raise ConnectionError("helper closed the connection")
        return line.decode().rstrip("\r\n")

    def batch(self, lines: list[list[str]]) -> tuple[int, int]:
        from annex_gahp.protocol import split_args  # noqa: PLC0415

        for args in lines:
            self.file.write((" ".join(args) + "\r\n").encode())
        self.file.flush()
        for _ in lines:
            reply = self.readline()
            while reply == "R":
                reply = self.readline()
            if not reply.startswith("S"):
                raise RuntimeError(f"refused: {reply}")
        want, ok, failed = len(lines), 0, 0
        while ok + failed < want:
            self.send(["RESULTS"])
            header = self.readline()
            while header == "R":
                header = self.readline()
            count = int(header.split()[1])
            for _ in range(count):
                parts = split_args(self.readline())
                if parts[1] == "0":
                    ok += 1
                else:
                    failed += 1
            if ok + failed < want and count == 0:
                time.sleep(0.0005)
        return ok, failed


def _pipelined(path: str, commands: list[tuple[str, dict]], stop_at: float, q) -> None:
    from annex_gahp.protocol import format_kv  # noqa: PLC0415

    session = _Session(path)
    time.sleep(max(0.0, stop_at - SECONDS - time.time()))
    done = errors = 0
    reqid = 0
    while time.time() < stop_at:
        lines = []
        for _ in range(BATCH):
            command, kwargs = commands[reqid % len(commands)]
            reqid += 1
            lines.append([command, str(reqid), *format_kv(kwargs)])
        ok, failed = session.batch(lines)
        done += ok + failed
        errors += failed
    q.send((done, errors))


def throughput(path: str, commands: list[tuple[str, dict]], mode: str) -> tuple[float, int]:
    target = _per_connection if mode == "per-connection" else _pipelined
    # Pipes, not a Queue: the sandbox has no usable /dev/shm for POSIX semaphores.
    stop_at = time.time() + 0.5 + SECONDS  # every client starts at stop_at - SECONDS
    pipes = [multiprocessing.Pipe(duplex=False) for _ in range(CLIENTS)]
    procs = [
        multiprocessing.Process(target=target, args=(path, commands, stop_at, w)) for _, w in pipes
    ]
    for p in procs:
        p.start()
    results = []
    for r, _ in pipes:
        if not r.poll(SECONDS + 60):
            raise TimeoutError("a client process did not report")
        results.append(r.recv())
    for p in procs:
        p.join()
    total = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    return total / SECONDS, errors


def measure_as_user(path: str, name: str) -> None:
    """As a plain user: both modes, STATUS and LIST alternating; prints JSON."""
    commands = [("ANNEX_STATUS", {"name": name}), ("ANNEX_LIST", {})]
    found = {}
    for mode in ("per-connection", "pipelined"):
        rate, errors = throughput(path, commands, mode)
        found[mode] = {"rate": rate, "errors": errors}
    print(json.dumps(found))


# --- the 1,000-annex helper ------------------------------------------------------------------


def launch_fill(ec2) -> list[str]:
    """1,000 instances: 850 in ONE reservation plus 150 single ones, each tagged as its own
    annex: 151 reservations = 2 pages of the helper's describe per cycle.

    Few reservations keep the emulator fast: moto filters every instance again for every page,
    and 10 pages of 100 reservations took it ~50 s per cycle here. The helper's memory does not
    depend on how EC2 groups instances into reservations."""
    expires = str(int(time.time()) + 4 * 3600)
    image = common.sandbox_env()["ANNEX_DEFAULT_IMAGE_ID"]
    common_tags = {"htcondor-annex:pool": FILL_POOL, "htcondor-annex:expires": expires}
    spec = [
        {
            "ResourceType": "instance",
            "Tags": [{"Key": k, "Value": v} for k, v in common_tags.items()],
        }
    ]

    def launch(count: int) -> list[str]:
        got = ec2.run_instances(
            ImageId=image,
            InstanceType="t3.micro",
            MinCount=count,
            MaxCount=count,
            TagSpecifications=spec,
        )
        return [i["InstanceId"] for i in got["Instances"]]

    ids = launch(FILL - SINGLES)
    with ThreadPoolExecutor(8) as pool:
        ids += [i for got in pool.map(launch, [1] * SINGLES) for i in got]

    def tag(item: tuple[int, str]) -> None:
        i, instance_id = item
        tags = {
            "htcondor-annex:name": f"fill{i:04d}",
            "htcondor-annex:owner": f"fillu{i % FILL_OWNERS}",
            "htcondor-annex:request": f"fill-{i}",
        }
        ec2.create_tags(
            Resources=[instance_id], Tags=[{"Key": k, "Value": v} for k, v in tags.items()]
        )

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(tag, enumerate(ids)))
    return ids


def start_fill_helper(endpoint: str) -> subprocess.Popen:
    shutil.rmtree(FILL_DIR, ignore_errors=True)
    os.makedirs(FILL_DIR)
    env = dict(os.environ)
    env.update(
        {
            "_CONDOR_ANNEX_STATE_DIR": f"{FILL_DIR}/state",
            "_CONDOR_ANNEX_GAHP_SOCKET": f"{FILL_DIR}/run/annex_gahp.sock",
            "_CONDOR_ANNEX_GAHP_LOG": f"{FILL_DIR}/log/AnnexGahpLog",
            "_CONDOR_ANNEX_POOL_ID": FILL_POOL,
            "_CONDOR_ANNEX_AWS_ENDPOINT_URL": endpoint,
            "_CONDOR_ANNEX_IDLE_TIMEOUT": "4h",
            "_CONDOR_ANNEX_RECONCILE_INTERVAL": "3",
        }
    )
    return subprocess.Popen(
        [HELPER, "--daemon"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(f"{FILL_DIR}/stderr", "w"),
        start_new_session=True,
    )


def rss_kb(pid: int) -> tuple[int, int]:
    values = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def main_helper_rss() -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import run  # noqa: PLC0415

    pids = run.helper_pids()
    return rss_kb(pids[0])[0] if pids else 0


def main() -> int:
    if os.geteuid() != 0:
        measure_as_user(sys.argv[1], sys.argv[2])
        return 0
    env = common.bench_env()
    ok = True
    # After the api benchmark the router may still run a translate hook for many of its
    # removed 1,000 jobs (router_quiet's docstring); those processes would be measured too.
    # Usually it is already quiet (no wait in the run of 2026-12-05 11:10).
    period = float(common.run(["condor_config_val", "JOB_ROUTER_POLLING_PERIOD"]).stdout or 5)
    waited = common.router_quiet(period)
    if waited > 1:
        common.out(f"  waited {waited:.0f} s for the job router to go quiet")
    # Throughput against the running helper, as alice, with one annex of hers.
    common.helper_call("ANNEX_CREATE", owner=USER, name=ANNEX, instances=1)
    done = common.run(
        [
            "runuser",
            "-u",
            USER,
            "--",
            sys.executable,
            os.path.abspath(__file__),
            "/var/run/condor/annex_gahp.sock",
            ANNEX,
        ]
    )
    if done.returncode != 0:
        common.out(done.stdout + done.stderr)
        return 1
    found = json.loads(done.stdout.strip().splitlines()[-1])
    common.out(
        f"  {CLIENTS} client processes x {SECONDS:.0f} s, ANNEX_STATUS/ANNEX_LIST alternating, "
        f"as {USER}"
    )
    for mode, figures in found.items():
        ok &= common.result(
            BENCH, f"requests/s, running helper, {mode}", figures["rate"], 1000, ">=", unit="/s"
        )
        if figures["errors"]:
            common.out(f"  ({figures['errors']} requests failed in {mode} mode)")
    common.out(f"  running helper RSS: {main_helper_rss() / 1024:.1f} MB")
    common.helper_call("ANNEX_DELETE", owner=USER, name=ANNEX)

    # 1,000 annexes: a scratch helper adopts them from their tags.
    ec2 = common.ec2()
    t0 = time.time()
    ids = launch_fill(ec2)
    common.out(
        f"  launched {len(ids)} tagged instances in the emulator in {time.time() - t0:.0f} s"
    )
    endpoint = f"http://127.0.0.1:{env['ports']['fill']}"
    t1 = time.time()
    proc = start_fill_helper(endpoint)
    sock = f"{FILL_DIR}/run/annex_gahp.sock"
    try:

        def adopted() -> bool:
            from annex_gahp import client  # noqa: PLC0415

            got = client.call("ANNEX_LIST", path=sock, timeout=60)
            return len(json.loads(got["json"])) >= FILL

        common.wait_for("the scratch helper to adopt 1,000 annexes", adopted, 240, every=2)
        common.out(f"  scratch helper adopted {FILL} annexes in {time.time() - t1:.0f} s")
        mark = time.time()

        def cycles() -> int:
            firsts = [
                c
                for c in common.calls("fill", mark)
                if c.get("action") == "DescribeInstances" and c.get("first")
            ]
            return len(firsts) >= 2

        # The second first page after adoption starts once a whole cycle over the 1,000
        # annexes (publish, reap, demand) has run.
        common.wait_for("a full reconcile cycle of the scratch helper", cycles, 240, every=1)
        rss, hwm = rss_kb(proc.pid)
        described = [
            c for c in common.calls("fill", mark) if c.get("action") == "DescribeInstances"
        ]
        firsts = sum(1 for c in described if c.get("first"))
        starts = [c["t"] for c in common.calls("fill") if c.get("first")]
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        page_ms = [c["ms"] for c in described if "ms" in c]
        if gaps:
            common.out(
                f"  scratch helper: reconcile cycle start to start {min(gaps):.0f}-"
                f"{max(gaps):.0f} s (ANNEX_RECONCILE_INTERVAL 3 s); emulator answered a "
                f"describe page in {common.median(page_ms) / 1000 if page_ms else 0:.1f} s "
                "(median)"
            )
        common.out(
            f"  scratch helper: {FILL} annexes, {FILL} instances; VmRSS {rss / 1024:.1f} MB, "
            f"VmHWM (peak) {hwm / 1024:.1f} MB; DescribeInstances pages per cycle "
            f"{len(described) / max(firsts, 1):.1f} ({SINGLES + 1} reservations: 2 pages of 100)"
        )
        ok &= common.result(
            BENCH, "helper RSS with 1,000 annexes", rss / 1024, 100, "<=", unit=" MB"
        )
        common.result(
            BENCH, "helper peak RSS (VmHWM) with 1,000 annexes", hwm / 1024, None, unit=" MB"
        )
        # Throughput against the 1,000-annex store, as admin (root): STATUS of one annex.
        os.environ["ANNEX_GAHP_SOCKET"] = sock
        rate, _ = throughput(
            sock, [("ANNEX_STATUS", {"name": "fill0001", "owner": "fillu1"})], "per-connection"
        )
        ok &= common.result(
            BENCH, "ANNEX_STATUS/s, 1,000-annex store, per-connection", rate, 1000, ">=", unit="/s"
        )
        rate, _ = throughput(
            sock, [("ANNEX_STATUS", {"name": "fill0001", "owner": "fillu1"})], "pipelined"
        )
        ok &= common.result(
            BENCH, "ANNEX_STATUS/s, 1,000-annex store, pipelined", rate, 1000, ">=", unit="/s"
        )
        rate, _ = throughput(sock, [("ANNEX_LIST", {})], "pipelined")
        common.result(
            BENCH, "ANNEX_LIST (all 1,000 annexes, admin)/s, pipelined", rate, None, unit="/s"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        for start in range(0, len(ids), 500):
            ec2.terminate_instances(InstanceIds=ids[start : start + 500])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
