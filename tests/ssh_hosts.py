"""A real, throw-away ssh server on 127.0.0.1 for tests of launchers that reach hosts over ssh.

DeepSpeed's multi-node launcher runs `ssh HOST hostname` and then `pdsh -w HOST1,HOST2 ...` (pdsh
calls `ssh`). This module starts `sshd` on a free port of 127.0.0.1 with keys made for the test, and
puts a `bin/ssh` first on PATH that runs the real ssh with a generated config (`-F`): port, key,
no host-key prompt. So the hosts `127.0.0.1` and `localhost` are two "nodes" reached over real ssh,
without touching ~/.ssh or the system's sshd.

    from ssh_hosts import ssh_hosts  # noqa: F401  (pytest fixture)

    def test_launch(ssh_hosts):
        env = ssh_hosts.env()               # PATH with the ssh shim first
        ssh_hosts.run("127.0.0.1", "hostname")

Tests skip, naming the package, where `openssh-server`, `openssh-client` or `pdsh` is missing
(tests/system-deps.sh installs them), and where sshd cannot start (e.g. not root and no
privilege-separation directory).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from vit.train.distributed import free_port

PROGRAMS = {"sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client", "pdsh": "pdsh"}


def _which(program: str) -> str | None:
    return shutil.which(program, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def missing_packages() -> list[str]:
    return sorted({pkg for prog, pkg in PROGRAMS.items() if _which(prog) is None})


class SshHosts:
    """sshd on 127.0.0.1:port serving this user with a test key, plus the ssh shim; a context manager."""

    def __init__(self, root: Path):
        self.root = root
        self.bin = root / "bin"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "SshHosts":
        r = self.root
        keygen = _which("ssh-keygen")
        for name in ("host_key", "user_key"):
            subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(r / name)], check=True)
        (r / "authorized_keys").write_text((r / "user_key.pub").read_text())
        (r / "authorized_keys").chmod(0o600)
        (r / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {r / 'host_key'}\n"
            f"AuthorizedKeysFile {r / 'authorized_keys'}\nPidFile {r / 'sshd.pid'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPrintMotd no\n"
            "AcceptEnv *\n")
        # What the launcher's ssh sees: our port and key, the test host key trusted, no prompts.
        (r / "ssh_config").write_text(
            f"Host 127.0.0.1 localhost\n  HostName 127.0.0.1\n  Port {self.port}\n  IdentityFile {r / 'user_key'}\n"
            f"  IdentitiesOnly yes\n  UserKnownHostsFile {r / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
            "  HostKeyAlias 127.0.0.1\n  BatchMode yes\n  LogLevel ERROR\n")
        host_key = " ".join((r / "host_key.pub").read_text().split()[:2])
        (r / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_key}\n127.0.0.1 {host_key}\n")
        self.bin.mkdir()
        shim = self.bin / "ssh"
        shim.write_text(f"#!/bin/sh\nexec {_which('ssh')} -F {r / 'ssh_config'} \"$@\"\n")
        shim.chmod(0o755)
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        self.proc = subprocess.Popen([_which("sshd"), "-D", "-e", "-f", str(r / "sshd_config")],
                                     stdout=subprocess.DEVNULL, stderr=open(r / "sshd.log", "w"))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(r / 'sshd.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("sshd did not listen within 15 s")
        for host in ("127.0.0.1", "localhost"):
            out = self.run(host, "echo ok")
            if out.returncode != 0 or out.stdout.strip() != "ok":
                raise RuntimeError(f"ssh {host} failed: {out.stderr[-2000:]}\nsshd: "
                                   f"{(r / 'sshd.log').read_text()[-2000:]}")
        return self

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        return env

    def run(self, host: str, command: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / "ssh"), host, command], capture_output=True, text=True,
                              timeout=30, env=self.env())

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def ssh_hosts(tmp_path_factory):
    missing = missing_packages()
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (tests/system-deps.sh installs them)")
    try:
        with SshHosts(tmp_path_factory.mktemp("ssh")) as hosts:
            yield hosts
    except RuntimeError as e:
        pytest.skip(f"could not start a test sshd on 127.0.0.1: {e}")
