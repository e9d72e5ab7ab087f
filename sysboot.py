"""A throwaway systemd for the tests: /lib/systemd/systemd booted as PID 1 of fresh PID, mount, UTS,
IPC and cgroup namespaces on a machine that has no systemd of its own, as root. Its commands
(`systemctl`, `journalctl`, `./install --system`) are run inside with `nsenter`; `systemctl exit`
ends it, SIGKILL if it will not, and its sub-cgroups are removed after.

Nothing it does reaches the machine's files. Its root is an overlay of the machine's whose upper
layer is a tmpfs of its own: every file systemd, a unit or an installer writes lives in memory and
is gone with the namespace. /run, /tmp, /var/tmp and /dev are fresh tmpfs mounts — at boot
`systemd-tmpfiles` empties /tmp, which in a namespace sharing the machine's /tmp would be the
machine's (a running test suite and every work directory in it). /sys and /proc/sys are read-only,
as systemd-nspawn leaves them, so that no unit changes the kernel's settings or sends udev events
to the machine's devices; the units that would try are masked too. The network is the machine's:
a server on loopback outside is reachable inside. The checkout is bound read-only inside at
`CHECKOUT` (under /root: the service must not need it, ProtectHome= hides it)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

CHECKOUT = "/root/tracker"
SYSTEMD = "/lib/systemd/systemd"
BOOT_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 30.0
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Units that would reach past the namespace (the clock, kernel settings and modules, the machine's
# devices and disks) or only cost boot time here (gettys, timers, the PostgreSQL package's service).
MASKED = (
    "systemd-timesyncd.service", "systemd-sysctl.service", "systemd-modules-load.service",
    "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount", "systemd-remount-fs.service",
    "systemd-udevd.service", "systemd-udevd-control.socket", "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service", "systemd-udev-settle.service", "systemd-hwdb-update.service",
    "systemd-pstore.service", "e2scrub_reap.service", "fstrim.service", "getty.target",
    "console-getty.service", "timers.target", "postgresql.service", "ldconfig.service",
    "sys-kernel-debug.mount", "sys-kernel-tracing.mount", "sys-fs-fuse-connections.mount",
)

# Runs as PID 1 of the new namespaces: builds the root, then becomes systemd. Arguments: the merged
# root's mount point, the layers' mount point (both empty directories outside), the checkout, the
# console log, the units to mask, then the cgroup hierarchies as "directory options" lines.
SETUP = r"""
set -eu
root=$1 layers=$2 checkout=$3 console=$4 masked=$5 hierarchies=$6 propagation=$7
mount --make-rprivate /
mount -t tmpfs -o mode=0700 sysboot-layers "$layers"
mkdir "$layers/upper" "$layers/work"
mount -t overlay -o "lowerdir=/,upperdir=$layers/upper,workdir=$layers/work" sysboot-root "$root"

ro_bind() { mount --bind "$1" "$2"; mount -o remount,bind,ro "$2"; }
mount -t proc proc "$root/proc"
ro_bind "$root/proc/sys" "$root/proc/sys"
[ ! -e "$root/proc/sysrq-trigger" ] || ro_bind "$root/proc/sysrq-trigger" "$root/proc/sysrq-trigger"
ro_bind /sys "$root/sys"
mount -t tmpfs -o mode=0755,nosuid,nodev,noexec sysboot-cgroup "$root/sys/fs/cgroup"
echo "$hierarchies" | while read -r dir fstype options; do
  [ -n "$dir" ] || continue
  mkdir -p "$root/sys/fs/cgroup/$dir"
  mount -t "$fstype" -o "$options" "$fstype" "$root/sys/fs/cgroup/$dir"  # rooted at this namespace's cgroups
done

mount -t tmpfs -o mode=0755,nosuid sysboot-dev "$root/dev"
for node in null zero full random urandom; do
  touch "$root/dev/$node"; mount --bind "/dev/$node" "$root/dev/$node"
done
mkdir "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev sysboot-shm "$root/dev/shm"
ln -s /proc/self/fd "$root/dev/fd"
for fd in 0:stdin 1:stdout 2:stderr; do ln -s "/proc/self/fd/${fd%%:*}" "$root/dev/${fd#*:}"; done
touch "$root/dev/console"; mount --bind "$console" "$root/dev/console"

mount -t tmpfs -o mode=0755,nosuid,nodev sysboot-run "$root/run"
mount -t tmpfs -o mode=1777,nosuid,nodev sysboot-tmp "$root/tmp"
mount -t tmpfs -o mode=1777,nosuid,nodev sysboot-vartmp "$root/var/tmp"
mkdir -p "$root/CHECKOUT"
ro_bind "$checkout" "$root/CHECKOUT"

for unit in $masked; do ln -sf /dev/null "$root/etc/systemd/system/$unit"; done
echo sysboot > "$root/etc/hostname"

cd "$root"
mkdir .sysboot-outside
pivot_root . .sysboot-outside
umount -l /.sysboot-outside
rmdir /.sysboot-outside
# As systemd makes it when the kernel starts it (a container manager is left to choose): a mount
# made in a unit's own namespace reaches the manager's, as LoadCredential='s does.
mount "--make-r$propagation" /
exec SYSTEMD --system --show-status=no
""".replace("CHECKOUT", CHECKOUT.lstrip("/")).replace("SYSTEMD", SYSTEMD)


class SystemdError(RuntimeError):
    pass


def _cgroup_hierarchies() -> list[tuple[str, str, str, str]]:
    """This machine's cgroup hierarchies: (directory under /sys/fs/cgroup, fstype, mount options,
    this process's cgroup in it)."""
    mine: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        mine[controllers] = path
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        separator = fields.index("-")
        mount_point, fstype, super_options = fields[4], fields[separator + 1], fields[separator + 3]
        if fstype not in ("cgroup", "cgroup2") or not mount_point.startswith("/sys/fs/cgroup/"):
            continue
        if fstype == "cgroup2":
            key, options = "", "rw"
        else:
            names = [o for o in super_options.split(",") if o not in ("rw", "ro")]
            key = ",".join(n for n in names if n != "xattr")
            options = ",".join(["rw", *names])
        if key in mine:
            found.append((mount_point.removeprefix("/sys/fs/cgroup/"), fstype, options, mine[key]))
    return found


class BootedSystemd:
    """A systemd booted in namespaces of its own (see the module's docstring)."""

    def __init__(self, workdir: Path, checkout: Path, propagation: str = "shared") -> None:
        self.workdir = workdir
        self.checkout = checkout
        self.propagation = propagation  # of the namespace's mounts: "shared" as on a host, or "private"
        self.console = workdir / "console.log"
        self.name = f"sysboot-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._cgroups: list[Path] = []
        self._unshare: subprocess.Popen[bytes] | None = None
        self.pid = 0  # systemd, PID 1 inside, as this machine numbers it

    # ── starting and stopping ──

    def boot(self) -> None:
        _remove_abandoned()
        (self.workdir / "root").mkdir()
        (self.workdir / "layers").mkdir()
        self.console.touch()
        hierarchies = _cgroup_hierarchies()
        procs = []
        for directory, _, _, mine in hierarchies:
            cgroup = Path("/sys/fs/cgroup", directory, mine.lstrip("/"), self.name)
            cgroup.mkdir()
            self._cgroups.append(cgroup)
            if directory == "cpuset":  # a new cpuset has no CPUs and no memory nodes: nothing can join it
                for name in ("cpuset.cpus", "cpuset.mems"):
                    (cgroup / name).write_text((cgroup.parent / name).read_text())
            procs.append(str(cgroup / "cgroup.procs"))
        spec = "\n".join(f"{d} {t} {o}" for d, t, o, _ in hierarchies)
        # The shell moves itself into the fresh cgroups (they become the namespace's cgroup root),
        # then becomes unshare; unshare dies with this process and takes the namespace with it.
        wrapper = 'set -e; for procs in $SYSBOOT_PROCS; do echo $$ > "$procs"; done; exec "$@"'
        argv = ["/bin/sh", "-c", wrapper, "sysboot",
                "setpriv", "--pdeathsig", "KILL", "--",
                "unshare", "--pid", "--fork", "--kill-child", "--mount", "--uts", "--ipc", "--cgroup",
                "--mount-proc", "--propagation", "private", "--",
                "/bin/sh", "-c", SETUP, "sysboot-setup", str(self.workdir / "root"), str(self.workdir / "layers"),
                str(self.checkout), str(self.console), " ".join(MASKED), spec, self.propagation]
        env = {"PATH": PATH, "container": "sysboot", "SYSBOOT_PROCS": " ".join(procs), "LANG": "C.UTF-8"}
        with open(self.workdir / "setup.log", "wb") as log:
            self._unshare = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self._wait_for_boot()

    def _wait_for_boot(self) -> None:
        assert self._unshare is not None
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while True:
            if self._unshare.poll() is not None:
                raise SystemdError(f"the namespace ended while booting (exit {self._unshare.returncode}):\n"
                                   + self.diagnostics())
            if not self.pid:
                self.pid = self._namespace_init()
            if self.pid and Path(f"/proc/{self.pid}/root/run/systemd/private").exists():
                break
            if time.monotonic() > deadline:
                raise SystemdError(f"systemd did not come up in {BOOT_TIMEOUT_S:.0f} s:\n" + self.diagnostics())
            time.sleep(0.05)  # polling for the socket, with a deadline
        left = max(1.0, deadline - time.monotonic())
        state = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=left).stdout.strip()
        if state not in ("running", "degraded"):
            raise SystemdError(f"systemd is {state!r} after booting:\n" + self.diagnostics())

    def _namespace_init(self) -> int:
        """The namespace's PID 1 once it runs systemd: the child unshare forked."""
        assert self._unshare is not None
        children = Path(f"/proc/{self._unshare.pid}/task/{self._unshare.pid}/children")
        try:
            pids = children.read_text().split()
            if pids and Path(f"/proc/{pids[0]}/exe").resolve().name == "systemd":
                return int(pids[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
        return 0

    def shutdown(self) -> None:
        """`systemctl exit`, then SIGKILL past the deadline; the cgroups and work directory removed."""
        try:
            if self._unshare is not None and self._unshare.poll() is None:
                if self.pid:
                    self.run("systemctl", "exit", check=False, timeout=EXIT_TIMEOUT_S)
                try:
                    self._unshare.wait(EXIT_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    if self.pid:
                        os.kill(self.pid, signal.SIGKILL)
                    self._unshare.kill()
                    self._unshare.wait(EXIT_TIMEOUT_S)
        finally:
            self._remove_cgroups()

    def _remove_cgroups(self) -> None:
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        for cgroup in self._cgroups:
            while cgroup.exists():
                try:
                    _remove_cgroup(cgroup)
                except OSError:  # EBUSY while the kernel still reaps the namespace's last processes
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

    @property
    def running(self) -> bool:
        return self._unshare is not None and self._unshare.poll() is None

    def leftovers(self) -> list[str]:
        """What of this boot is still on the machine (nothing, once shut down): its processes,
        cgroups, work directory, or a mount of its in this process's namespace."""
        found = [f"systemd, pid {self.pid}"] if self.running else []  # unshare ends only after it
        found += [f"cgroup {c}" for c in self._cgroups if c.exists()]
        found += [f"directory {self.workdir}"] if self.workdir.exists() else []
        found += [f"mount {line}" for line in Path("/proc/self/mountinfo").read_text().splitlines()
                  if "sysboot" in line or str(self.workdir) in line]
        return found

    # ── inside ──

    def run(self, *argv: str, input: str | None = None, env: Mapping[str, str] | None = None,
            check: bool = True, timeout: float = 60.0, cwd: str = "/") -> subprocess.CompletedProcess[str]:
        """A command inside (all of systemd's namespaces, its root), with a clean environment."""
        command = ["nsenter", "-t", str(self.pid), "-a", "--", "/usr/bin/env", "-i", f"--chdir={cwd}",
                   *(f"{k}={v}" for k, v in {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}.items()),
                   *argv]
        result = subprocess.run(command, input=input, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise SystemdError(f"{shlex.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def path(self, inside: str) -> Path:
        """A path inside, as this machine reaches it."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def diagnostics(self) -> str:
        parts = []
        for log in (self.workdir / "setup.log", self.console):
            if log.exists():
                parts.append(f"── {log.name} ──\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:]))
        return "\n".join(parts)


def _remove_cgroup(cgroup: Path) -> None:
    """A cgroup and the ones below it, deepest first (only an empty cgroup can be removed)."""
    for sub in sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        sub.rmdir()
    cgroup.rmdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _remove_abandoned() -> None:
    """What a boot of a process that was killed left (its systemd died with it, through unshare's
    --kill-child): the cgroups and work directories named after a process that is gone."""
    for directory, _, _, mine in _cgroup_hierarchies():
        for cgroup in Path("/sys/fs/cgroup", directory, mine.lstrip("/")).glob("sysboot-*-*"):
            match = re.fullmatch(r"sysboot-(\d+)-[0-9a-f]+", cgroup.name)
            if match and not _alive(int(match.group(1))):
                try:
                    _remove_cgroup(cgroup)
                except OSError:
                    pass  # still busy: the next boot tries again
    for workdir in Path(tempfile.gettempdir()).glob("tracker-systemd-*-*"):
        match = re.fullmatch(r"tracker-systemd-(\d+)-\w+", workdir.name)
        if match and workdir.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def booted_systemd(checkout: Path, propagation: str = "shared") -> Iterator[BootedSystemd]:
    """A systemd booted for the block (its work directory from tempfile: a console log), stopped,
    its cgroups and work directory removed when the block ends, however it ends."""
    if os.geteuid() != 0:
        raise SystemdError("booting systemd needs root")
    workdir = Path(tempfile.mkdtemp(prefix=f"tracker-systemd-{os.getpid()}-"))
    booted = BootedSystemd(workdir, checkout, propagation)
    try:
        booted.boot()
        yield booted
    finally:
        try:
            booted.shutdown()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
