"""`annex_gahp`: the helper. Under condor_master it is a daemon; on a terminal or pipe it is a GAHP.

Under condor_master (CONDOR_INHERIT set, started as root): prepare its paths without following
any symlink, become the condor user for good (no root left, not even as the saved uid: tokens
are signed with the project's own key, see tokens.py), open the state store, serve the Unix socket
the hooks and CLI use, and run the reconcile loop. On stdin/stdout: relay to the running
daemon's socket, so a GAHP client gets the same records and the kernel's word on who it is.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import os
import pwd
import signal
import socket
import stat
import sys
import threading
import time
from typing import Any

from annex_gahp import compat, faults, logsetup
from annex_gahp import settings as settings_mod
from annex_gahp.errors import AnnexError

log = logging.getLogger("annex_gahp")


def _drop_privileges(user: str = "condor") -> pwd.struct_passwd:
    entry = pwd.getpwnam(user)
    if os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
        # Real, effective and saved: nothing in the helper can become root again. Tokens are
        # signed with the project's own key, which the condor user reads (tokens.py).
        os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)
        if 0 in os.getresuid() or 0 in os.getresgid():
            raise SystemExit("annex_gahp: could not give up root")
    os.environ["HOME"] = entry.pw_dir
    os.environ["USER"] = os.environ["LOGNAME"] = user
    return entry


def _prepare_dirs(cfg: settings_mod.Settings, owner: pwd.struct_passwd) -> None:
    """Make the log file, the state dir and the socket dir, owned by the condor user.

    Done as root, in places the condor user can write to: a symlink planted there (say
    AnnexGahpLog -> /etc/shadow) must not make root create, open or chown what it points to.
    So paths are walked one component at a time without following a symlink root does not
    own (`_open_dir`), and files are opened with O_NOFOLLOW and changed through their fd. A
    state or socket dir that is not a plain directory is refused (AnnexError naming it); a
    log file that is not a plain file is moved aside, a new log started, and the new log
    says so (`_prepare_log`)."""
    if os.geteuid() != 0:
        # Unprivileged: whatever a symlink points to, we can only do what we may anyway.
        for path, mode in ((cfg.state_dir, 0o700), (os.path.dirname(cfg.socket_path), 0o755)):
            os.makedirs(path, mode=mode, exist_ok=True)
        return
    if os.path.dirname(cfg.log_file):
        _prepare_log(cfg.log_file, owner)
    for knob, path, mode in (
        ("ANNEX_STATE_DIR", cfg.state_dir, 0o700),
        ("ANNEX_GAHP_SOCKET", os.path.dirname(cfg.socket_path), 0o755),
    ):
        fd = _open_dir(path, mode, knob)
        try:
            os.fchown(fd, owner.pw_uid, owner.pw_gid)
        finally:
            os.close(fd)


def _refuse_path(knob: str, path: str, what: str) -> AnnexError:
    return AnnexError(
        f"{knob} {path}: {what}; refusing to use it as root (remove it, or point {knob} elsewhere)"
    )


def _open_dir(path: str, leaf_mode: int | None, knob: str) -> int:
    """An O_DIRECTORY fd for absolute `path`, reached from / one component at a time. Missing
    directories are made (0755, the last one `leaf_mode`); a symlink is followed only if root
    owns it (as /var/run -> /run), and a component that is not a directory is refused. The
    stat and the O_NOFOLLOW open of each step mean a swap in between is refused, not
    followed. Raises AnnexError naming `knob` and `path`."""
    if not os.path.isabs(path):
        raise _refuse_path(knob, path, "not an absolute path")
    parts = [p for p in os.path.normpath(path).split("/") if p]
    where, hops = "/", 0
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        while parts:
            name = parts.pop(0)
            here = os.path.join(where, name)
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                mode = leaf_mode if (not parts and leaf_mode is not None) else 0o755
                os.mkdir(name, mode, dir_fd=fd)
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                target = os.readlink(name, dir_fd=fd)
                if info.st_uid != 0:
                    raise _refuse_path(
                        knob, path, f"{here} is a symlink (to {target}) owned by uid {info.st_uid}"
                    )
                hops += 1
                if hops > 40:
                    raise _refuse_path(knob, path, "too many levels of symlinks")
                # Root's own symlink: start again from / with the target in its place.
                rest = os.path.normpath(os.path.join(where, target, *parts))
                parts = [p for p in rest.split("/") if p]
                os.close(fd)
                fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                where = "/"
                continue
            if not stat.S_ISDIR(info.st_mode):
                raise _refuse_path(knob, path, f"{here} is not a directory")
            try:
                step = os.open(
                    name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
            except OSError as err:  # ELOOP, ENOTDIR: swapped since the stat
                why = f"{here} changed under us ({err.strerror})"
                raise _refuse_path(knob, path, why) from None
            os.close(fd)
            fd, where = step, here
    except BaseException:
        os.close(fd)
        raise
    return fd


def _prepare_log(path: str, owner: pwd.struct_passwd) -> None:
    """The log file, a plain file with one link, owned by the condor user. Anything else in
    its place (a symlink, a hard link, a FIFO, a directory) is not followed or opened: it is
    renamed to <name>.refused-<time> for the admin to look at, and the new log's first line
    says so."""
    folder, name = os.path.split(path)
    dfd = _open_dir(folder, None, "ANNEX_GAHP_LOG")
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    note = ""
    try:
        what = ""
        try:
            fd = os.open(name, flags, 0o644, dir_fd=dfd)
        except OSError as err:
            if err.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EWOULDBLOCK):
                raise _refuse_path("ANNEX_GAHP_LOG", path, err.strerror or str(err)) from None
            fd = -1
        if fd >= 0:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                os.close(fd)
                fd = -1
                what = f"a file with {info.st_nlink} links" if stat.S_ISREG(info.st_mode) else ""
        if fd < 0:
            info = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if not what and stat.S_ISLNK(info.st_mode):
                what = f"a symlink to {os.readlink(name, dir_fd=dfd)}"
            what = what or f"not a regular file (mode {stat.filemode(info.st_mode)})"
            aside = f"{name}.refused-{int(time.time())}"
            os.rename(name, aside, src_dir_fd=dfd, dst_dir_fd=dfd)
            try:
                fd = os.open(name, flags | os.O_EXCL, 0o644, dir_fd=dfd)
            except OSError as err:
                raise _refuse_path(
                    "ANNEX_GAHP_LOG", path, f"{what}, and it came back ({err.strerror})"
                ) from None
            note = (
                f"ANNEX_GAHP_LOG {path} was {what}: not followed nor changed; moved it aside "
                f"to {os.path.join(folder, aside)} and started a new log"
            )
        try:
            os.fchown(fd, owner.pw_uid, owner.pw_gid)
            if note:
                record = log.makeRecord(log.name, logging.WARNING, __file__, 0, note, None, None)
                line = logging.Formatter(logsetup.FORMAT, logsetup.DATEFMT).format(record)
                os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
    finally:
        os.close(dfd)


def _take_lock(state_dir: str) -> Any:
    handle = open(os.path.join(state_dir, "annex_gahp.lock"), "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise AnnexError(
            f"another annex_gahp already owns {state_dir}; only one helper may run per state dir"
        ) from None
    return handle


OLD_TIMEOUT_KNOB = "ANNEX_GAHP_NOT_RESPONDING_TIMEOUT"


class MasterLink:
    """What a DaemonCore daemon tells its condor_master, done for this non-DaemonCore program.

    - Alive: `htcondor2.send_alive` (DC_CHILDALIVE to the master named in CONDOR_INHERIT) works
      from here with Debian's 23.9 bindings: the master accepts it from the condor user (DAEMON
      level) and, from the first one on, kills the helper as hung ("appears hung! Killing it
      hard") when the next one is later than the timeout we gave, then restarts it. The loop
      sends one every third of ANNEXD_NOT_RESPONDING_TIMEOUT (else NOT_RESPONDING_TIMEOUT,
      default 3600 s), so a wedged reconcile loop is replaced, not left serving stale records.
      ANNEXD is the helper's name in DAEMON_LIST, and DaemonCore reads
      <name>_NOT_RESPONDING_TIMEOUT the same way.
    - Ready: `htcondor2.set_ready_state` exists from 24.1.1 on (not in 23.9); it is called
      when present (compat.set_ready_state). Without it the master shows no ready state for
      ANNEXD.
    """

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("CONDOR_INHERIT"))
        self.timeout = 3600
        self._last = 0.0
        self._failing = False

    def configure(self) -> None:
        value = None
        for knob in ("ANNEXD_NOT_RESPONDING_TIMEOUT", "NOT_RESPONDING_TIMEOUT"):
            value = compat.param(knob)
            if value is not None:
                break
        if compat.param(OLD_TIMEOUT_KNOB) is not None:
            # The daemon was called ANNEX_GAHP before; a site's old setting must not pass silently.
            log.warning(
                "%s is no longer read: rename it ANNEXD_NOT_RESPONDING_TIMEOUT", OLD_TIMEOUT_KNOB
            )
        try:
            self.timeout = max(10, int(str(value))) if value is not None else 3600
        except ValueError:
            log.error("NOT_RESPONDING_TIMEOUT = %r is not a number; using 3600", value)
            self.timeout = 3600
        self._last = 0.0  # a new timeout takes effect with the next alive

    def alive(self) -> None:
        now = time.monotonic()
        if not self.enabled or (self._last and now - self._last < self.timeout / 3):
            return
        import htcondor2  # noqa: PLC0415

        try:
            htcondor2.send_alive(pid=os.getpid(), timeout=self.timeout)
        except Exception as err:  # the master restarting must not stop the loop
            if not self._failing:
                log.warning("could not tell condor_master this helper is alive: %s", err)
            self._failing = True
            return
        if self._failing or not self._last:
            log.info("told condor_master: alive, next within %d s", self.timeout)
        self._failing = False
        self._last = now

    def ready(self) -> None:
        set_ready = compat.set_ready_state()
        if not self.enabled or set_ready is None:
            return
        try:
            set_ready("Ready")
            log.info("told condor_master: Ready")
        except Exception as err:
            log.warning("could not tell condor_master this helper is ready: %s", err)


class Helper:
    """The long-running parts, wired together."""

    def __init__(self, cfg: settings_mod.Settings) -> None:
        from annex_gahp.cloud.aws.cloud import AwsCloud  # noqa: PLC0415
        from annex_gahp.collector import AnnexSlots, BudgetPublisher, Publisher  # noqa: PLC0415
        from annex_gahp.prices import PriceSource  # noqa: PLC0415
        from annex_gahp.reconcile import Reconciler  # noqa: PLC0415
        from annex_gahp.schedd import ScheddDemand  # noqa: PLC0415
        from annex_gahp.service import AnnexService  # noqa: PLC0415
        from annex_gahp.store import Store  # noqa: PLC0415

        self.cfg = cfg
        self.master = MasterLink()
        self.stop = threading.Event()
        self._wake = threading.Event()
        # Signals received and not yet acted on; only the signal handlers append to it.
        self._signals: list[int] = []
        self.store = Store(os.path.join(cfg.state_dir, "annexes.sqlite"))
        demand = self.demand = ScheddDemand(cfg.schedds)
        # One ScheddDemand for both: JOB_ROUTED checks a job against the loop's last demand
        # query (service._check_still_waiting).
        self.service = AnnexService(
            self.store, cfg, wake=self._wake.set, hold_job=demand.hold_job, jobs=demand
        )
        cloud = AwsCloud(cfg)
        self.reconciler = Reconciler(
            self.store,
            cfg,
            cloud,
            demand,
            Publisher(),
            slots=AnnexSlots(),
            wake=self._wake.set,
            prices=PriceSource(cfg.price_file, cfg.price_refresh, cloud.spot_prices),
            budget_ads=BudgetPublisher(),
        )

    def reload(self) -> None:
        import htcondor2  # noqa: PLC0415

        try:
            htcondor2.reload_config()
            cfg = settings_mod.load()
        except Exception as err:  # a typo in a knob must not take the helper down
            log.error("configuration reload failed; keeping the previous knobs: %s", err)
            return
        arm_faults(cfg)
        self.master.configure()
        self.cfg = self.service.settings = self.reconciler.settings = cfg
        self.reconciler.cloud.settings = cfg
        self.demand.serve(cfg.schedds)
        prices = self.reconciler.ctx.prices
        if prices is not None:  # ANNEX_PRICE_FILE, ANNEX_PRICE_REFRESH
            prices.path, prices.refresh_every = cfg.price_file, cfg.price_refresh
        log.info("configuration reloaded")
        self._wake.set()

    def signalled(self, signum: int, _frame: Any = None) -> None:
        """The signal handler: it only notes the signal, and the loop acts on it. A handler runs
        in the main thread between two bytecodes of whatever that thread was doing; one that
        took a lock there (Event.set while the loop holds that Event's lock inside wait(), or
        HTCondor's config reload) could wait for itself forever, the loop dead while the
        socket threads kept answering."""
        self._signals.append(signum)  # atomic under the GIL, no lock

    def _act_on_signals(self) -> None:
        pending = []
        while self._signals:
            pending.append(self._signals.pop(0))
        for signum in sorted(set(pending) - {signal.SIGHUP}):
            log.info("signal %d: shutting down", signum)
            self.stop.set()
        if signal.SIGHUP in pending and not self.stop.is_set():
            self.reload()  # once, however many reconfigs came in meanwhile

    def _sleep(self) -> None:
        """Wait for the next cycle: the interval, a wake-up from a request handler, or a
        signal (seen within a second)."""
        deadline = time.monotonic() + self.cfg.reconcile_interval
        while not self._signals and not self.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or self._wake.wait(min(left, 1.0)):
                break
        self._wake.clear()

    def loop(self) -> None:
        self.master.configure()
        self.master.alive()
        try:
            self.reconciler.recover()
        except Exception:
            log.exception("recovery after restart failed; retrying in the loop")
        self.master.ready()
        while True:
            self._act_on_signals()
            if self.stop.is_set():
                break
            try:
                self.reconciler.run_once()
            except Exception:
                log.exception("reconcile cycle failed")
            self.master.alive()
            self._sleep()

    def shutdown(self) -> None:
        self.stop.set()
        self._wake.set()


def arm_faults(cfg: settings_mod.Settings) -> None:
    import htcondor2  # noqa: PLC0415

    faults.arm(htcondor2.param.get("ANNEX_GAHP_TEST_FAULTS") or "", cfg.endpoint_url, cfg.state_dir)


def _undo_daemoncore_start() -> None:
    """condor_master counts ANNEXD among its built-in DaemonCore daemons (DC_DAEMON_LIST's
    default, left from upstream's old condor_annexd), so it starts the helper as one: with every
    signal still blocked (a DaemonCore daemon unblocks them itself), so SIGHUP from
    condor_reconfig and SIGTERM from condor_off would never arrive; and with TCP and UDP command
    sockets in CONDOR_INHERIT, on a port whose connections nobody would accept. Undo both."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        try:
            if fd > 2 and os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                os.close(fd)
        except OSError:
            pass  # the listdir's own fd, gone by now


def run_daemon() -> int:
    from annex_gahp.gahp import Dispatcher  # noqa: PLC0415
    from annex_gahp.transports import SocketServer  # noqa: PLC0415

    if os.environ.get("CONDOR_INHERIT"):
        _undo_daemoncore_start()
    # Until the handlers below are in place a reconfig must not kill us (SIGHUP's default):
    # the knobs are being read fresh anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    condor = pwd.getpwnam("condor")
    try:
        cfg = settings_mod.load()
        _prepare_dirs(cfg, condor)
    except AnnexError as err:
        return _refuse_early(err, condor)
    _drop_privileges()
    logsetup.configure(cfg.log_file)
    log.info("annex_gahp starting (pid %d) as %s", os.getpid(), condor.pw_name)
    arm_faults(cfg)
    try:
        lock = _take_lock(cfg.state_dir)
        helper = Helper(cfg)
    except AnnexError as err:
        log.error("%s", err)
        print(f"annex_gahp: {err}", file=sys.stderr)
        return 1
    dispatcher = Dispatcher(helper.service.commands())
    server = SocketServer(cfg.socket_path, dispatcher, admin_uids={condor.pw_uid})

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, helper.signalled)
    threading.Thread(target=server.serve_forever, name="socket", daemon=True).start()
    log.info("serving %s", cfg.socket_path)
    try:
        helper.loop()
    finally:
        server.shutdown()
        helper.store.close()
        lock.close()
        log.info("annex_gahp stopped")
    return 0


def _refuse_early(err: AnnexError, condor: pwd.struct_passwd) -> int:
    """A knob that does not parse, or a path start-up refuses (_prepare_dirs): say so in the
    log (whose own knob is read raw), not only on stderr, which condor_master sends to
    /dev/null. The log is prepared as safely as in _prepare_dirs."""
    import htcondor2  # noqa: PLC0415

    path = str(htcondor2.param.get("ANNEX_GAHP_LOG") or "/var/log/condor/AnnexGahpLog")
    try:
        if os.geteuid() == 0:
            _prepare_log(path, condor)
        _drop_privileges()
        logsetup.configure(path)
        log.error("annex_gahp cannot start (pid %d): %s", os.getpid(), err)
    except (OSError, AnnexError):
        pass
    print(f"annex_gahp: {err}", file=sys.stderr)
    return 1


def relay_stdio(path: str) -> int:
    """Be a plain GAHP on stdin/stdout by relaying to the daemon's socket."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError as err:
        print(
            f"annex_gahp: the helper daemon is not running ({path}: {err.strerror}); "
            "ask your HTCondor admin to check ANNEXD in DAEMON_LIST",
            file=sys.stderr,
        )
        return 1

    def pump_out() -> None:
        while data := conn.recv(65536):
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        os._exit(0)  # the daemon closed (QUIT): nothing more to relay

    threading.Thread(target=pump_out, daemon=True).start()
    for chunk in iter(sys.stdin.buffer.readline, b""):
        conn.sendall(chunk)
    conn.shutdown(socket.SHUT_WR)
    threading.Event().wait(5)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="annex_gahp", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--daemon", action="store_true", help="run as the helper daemon")
    mode.add_argument("--stdio", action="store_true", help="speak GAHP on stdin/stdout")
    args = parser.parse_args(argv)
    # condor_master starts DAEMON_LIST programs with CONDOR_INHERIT set and no arguments.
    if args.daemon or (not args.stdio and os.environ.get("CONDOR_INHERIT")):
        return run_daemon()
    from annex_gahp.client import socket_path  # noqa: PLC0415

    return relay_stdio(socket_path())


if __name__ == "__main__":
    sys.exit(main())
