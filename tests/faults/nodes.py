"""Private RabbitMQ nodes for the fault suite: never the shared ``rabbit@localhost``.

A :class:`RabbitNode` has its own node name, AMQP port, distribution port and data, log and
config files under a temporary directory; it uses the shared Erlang cookie (copied into its own
``HOME``) so that ``rabbitmqctl -n NAME`` can drive it. Every wait is bounded.
TLS certificates are generated at test time with ``cryptography``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SHARED_COOKIE = Path("/var/lib/rabbitmq/.erlang.cookie")
SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def ctl(node: str, *args: str, timeout: float = 60, check: bool = True) -> str:
    """``rabbitmqctl -n node -q ARGS``; returns stdout."""
    done = subprocess.run(
        ["rabbitmqctl", "-n", node, "-q", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl -n {node} {' '.join(args)}: {done.stderr.strip()[-500:]}")
    return done.stdout


@dataclass
class RabbitNode:
    """One private node. ``start`` boots it (detached), ``stop`` halts it and waits."""

    base: Path
    name: str
    port: int
    dist_port: int
    tls_port: int | None = None
    certs: Certificates | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def tls_url(self) -> str:
        assert self.tls_port is not None
        return f"amqps://guest:guest@localhost:{self.tls_port}/"

    @property
    def pid_file(self) -> Path:
        return self.base / "pid"

    def _write_config(self) -> None:
        for sub in ("home", "mnesia", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        cookie = self.base / "home" / ".erlang.cookie"
        if not cookie.exists():
            shutil.copyfile(SHARED_COOKIE, cookie)
            cookie.chmod(0o400)
        lines = [
            f"listeners.tcp.1 = 127.0.0.1:{self.port}",
            "loopback_users.guest = true",
            "log.console = false",
            "log.file.level = info",
        ]
        if self.tls_port is not None:
            assert self.certs is not None
            lines += [
                f"listeners.ssl.1 = 127.0.0.1:{self.tls_port}",
                f"ssl_options.cacertfile = {self.certs.ca}",
                f"ssl_options.certfile = {self.certs.server_cert}",
                f"ssl_options.keyfile = {self.certs.server_key}",
                "ssl_options.verify = verify_none",
                "ssl_options.fail_if_no_peer_cert = false",
            ]
        (self.base / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq/rabbitmq-env.conf
        self.base.chmod(0o755)  # rabbitmqctl runs as user rabbitmq and reads the pid file

    def env(self) -> dict[str, str]:
        b = self.base
        return {
            **os.environ,
            "HOME": str(b / "home"),
            "RABBITMQ_CONF_ENV_FILE": str(b / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(b / "mnesia"),
            "RABBITMQ_LOG_BASE": str(b / "log"),
            "RABBITMQ_CONFIG_FILE": str(b / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(b / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def start(self, timeout: float = 120) -> None:
        """Boot the node and wait until it accepts AMQP connections."""
        for port in (self.port, self.dist_port, self.tls_port):
            if port is not None and not port_free(port):
                raise RuntimeError(f"port {port} is taken; cannot start {self.name}")
        self._write_config()
        subprocess.run([SERVER, "-detached"], env=self.env(), cwd=self.base, check=True, timeout=60)
        self.await_running(timeout)

    def await_running(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self.name} did not start:\n{self.log_tail()}")
            try:
                ctl(self.name, "await_startup", "--timeout", str(int(max(left, 1))), timeout=left)
                if _answers(self.port):
                    return
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
            time.sleep(0.5)

    def stop_app(self) -> None:
        ctl(self.name, "stop_app")

    def start_app(self) -> None:
        ctl(self.name, "start_app", timeout=120)
        deadline = time.monotonic() + 60
        while not _answers(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} listener not back")
            time.sleep(0.1)

    def os_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self, timeout: float = 60) -> None:
        """Halt the node (rabbitmqctl stop), then make sure its OS process is gone."""
        pid = self.os_pid()
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            ctl(self.name, "stop", timeout=timeout)
        if pid is None:
            return
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):  # our own node, by its own pid: never anything else
            os.kill(pid, signal.SIGKILL)

    def log_tail(self, chars: int = 3000) -> str:
        log = self.base / "log" / f"{self.name}.log"
        return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


@dataclass(frozen=True)
class Certificates:
    """PEM files: a CA, a server certificate (localhost, 127.0.0.1) it signed, another CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    wrong_ca: Path


def make_certificates(directory: Path) -> Certificates:
    """Generate a CA, a server certificate for localhost/127.0.0.1, and an unrelated CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return key, cert

    ca_key, ca_cert = ca("qworker faults test CA")
    _, wrong_cert = ca("qworker faults unrelated CA")
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = Certificates(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        wrong_ca=directory / "wrong-ca.pem",
    )
    paths.ca.write_bytes(ca_cert.public_bytes(pem))
    paths.wrong_ca.write_bytes(wrong_cert.public_bytes(pem))
    paths.server_cert.write_bytes(server_cert.public_bytes(pem))
    paths.server_key.write_bytes(
        server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths
