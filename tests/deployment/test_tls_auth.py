"""Real Flower 1.41 deployment on loopback: TLS SuperLink, authenticated SuperNodes, one run.

One module-scoped federation (a SuperLink with `--enable-supernode-auth` and three registered
hospitals) serves every test; the run itself is a second module fixture so the cheap refusal
tests go first. That one run goes through both incidents a deployment must survive (a SuperNode
killed mid-run, then the ServerApp killed and the run resumed): each `flwr run` costs a ServerApp
start, a handshake, an audit and an export, so one run is checked from every side. Every process
is started in its own session and torn down, with everything it spawned, in a finalizer. See
docs/operating-guide.md for the same commands by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from configs.settings import load_settings
from privacy.certs import CertPaths, NodeKeyPaths, create_node_keys, init_ca_and_superlink
from privacy.ledger import PrivacyLedger
from simulation.runner import prepare_demo_cohort
from tests.support.runs import NO_RISK_OVERRIDES

REPO = Path(__file__).resolve().parents[2]
HOSPITALS = ("hospital-1", "hospital-2", "hospital-3")
CONNECTION = "mindfed-test"
MAX_EPSILON = 5.0
DELTA = 1e-5
PATIENTS = 300
WAIT_S = 240.0  # the longest any single wait may take (a 2-core CI machine under load)
POLL_S = 0.5
TINY_RUN = (
    f"federation.patients={PATIENTS}",
    "stages.0.model=dp-ctgan",  # trained in rounds: dropout and resume happen between them
    "export.synthetic_rows=200",
    "export.round_sample_rows=100",
    "model.dp-ctgan.generator_dims=[16]",
    "model.dp-ctgan.discriminator_dims=[16]",
    "model.dp-ctgan.embedding_dim=8",
    # no TimeGAN phases (they would add rounds beyond the time budget); its share to the generator
    "stages.timegan=false",
    "stages.0.epsilon_share=0.75",
    "audit.release_on_fail=true",  # tiny cohorts: the audit's verdict is chance; the release is checked
    NO_RISK_OVERRIDES,  # risk models have their own tests; these runs check deployment
)
# Rounds enough for round 1 with all three, rounds without hospital-3 up to the ServerApp's
# crash, and rounds with the restarted hospital-3 after the resume. A quorum of two lets a round
# go on without the killed node. The run may only lower each node's max epsilon (MAX_EPSILON).
ROUNDS = 5
RUN_MAX_EPSILON = 3.0
RUN_OVERRIDES = " ".join(
    [
        f"stages.0.rounds={ROUNDS}",
        "federation.min_replies=2",
        f"privacy.max_epsilon={RUN_MAX_EPSILON}",
        *TINY_RUN,
    ]
)
# Without these Flower phones home and builds a per-app environment (pulling CUDA torch).
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "PYTHONUNBUFFERED": "1",
}
# Flower 1.41's own log lines (see flwr/supernode, flwr/server/superlink/linkstate).
SUPERLINK_READY = "Uvicorn running on https://127.0.0.1:"
NODE_CONNECTED = "SuperNode ID:"
NODE_CONNECT_FAILED = "Failed to initialize the connection to the SuperLink"
NODE_ACTIVATION_REFUSED = "Failed to activate SuperNode"
UNKNOWN_KEY = "No SuperNode found with the given public key"
PLAINTEXT_WITH_KEY = "SuperNode authentication requires a secure TLS connection"

JSON = ("--format", "json")
# Set in every process the module starts (and so inherited by all they spawn): teardown kills
# exactly the processes that carry it.
TAG_VAR = "MINDFED_DEPLOYMENT_TEST_ROOT"

_BIN_DIR = Path(sys.executable).parent


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(_BIN_DIR)) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not found next to {sys.executable} or on PATH")
    return found


# --- processes ------------------------------------------------------------------------------


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state is the first field after the parenthesised command name.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _signal(pid: int, sig: signal.Signals, *, group: bool = False) -> None:
    with suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, sig)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])


@dataclass
class Processes:
    """Every process this module starts, and everything those spawn, tagged and torn down.

    Each process gets its own session (`start_new_session=True`) and an environment variable
    naming this module's temp folder. Flower passes its environment on to what it spawns
    (SuperExec, ServerApp, ClientApp processes); the SuperLink even starts its SuperExec in a
    session of its own, so the tag, not the process group, is what finds every last process.
    Only tagged processes are ever signalled, so a recycled pid cannot hit a stranger.
    """

    root: Path
    env: dict[str, str]
    started: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._tag = f"{TAG_VAR}={self.root}".encode()
        self.env = {**self.env, TAG_VAR: str(self.root)}

    def start(self, name: str, argv: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> Proc:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as handle:
            popen = subprocess.Popen(
                argv,
                cwd=cwd,
                env={**self.env, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.started.append(proc)
        return proc

    def tagged(self) -> list[int]:
        found = []
        for pid in _pids():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if self._tag in environ.split(b"\0") and _alive(pid):
                found.append(pid)
        return found

    def stop_all(self) -> None:
        # Everything started after the SuperLink first (SuperNodes, `flwr run`), then the
        # SuperLink, so SuperNodes can still tell it they are leaving. A running group leader
        # means the group is still ours, so signalling the group is safe.
        for batch in (self.started[1:], self.started[:1]):
            for proc in batch:
                if proc.popen.poll() is None:
                    _signal(proc.popen.pid, signal.SIGTERM, group=True)
            for proc in batch:
                with suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=10)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in self.started:
                if proc.popen.poll() is None:
                    _signal(proc.popen.pid, sig, group=True)
            for pid in self.tagged():
                _signal(pid, sig)
            deadline = time.monotonic() + 10
            while self.tagged() and time.monotonic() < deadline:
                time.sleep(0.2)
        for proc in self.started:
            with suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=5)


def wait_for(
    what: str, condition: Callable[[], bool], *, timeout: float = WAIT_S, context: Callable[[], str] = str
) -> None:
    assert timeout <= WAIT_S
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(POLL_S)
    if condition():
        return
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{context()}")


def wait_until_logged(proc: Proc, needle: str, *, timeout: float = WAIT_S) -> None:
    def seen() -> bool:
        if needle in proc.text():
            return True
        if proc.popen.poll() is not None:
            pytest.fail(
                f"{proc.name} exited ({proc.popen.returncode}) before logging {needle!r}:\n{proc.tail()}"
            )
        return False

    wait_for(f"{proc.name} to log {needle!r}", seen, timeout=timeout, context=proc.tail)


def free_ports(count: int) -> list[int]:
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


# --- the federation -------------------------------------------------------------------------


@dataclass
class Federation:
    root: Path
    procs: Processes
    certs: CertPaths
    keys: dict[str, NodeKeyPaths]
    cohort: Path
    coordinator_home: Path
    superlink: Proc
    superlink_port: int
    spare_ports: list[int]
    node_ids: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, Proc] = field(default_factory=dict)

    @property
    def fleet_address(self) -> str:
        return f"127.0.0.1:{self.superlink_port}"

    def state_dir(self, hospital: str) -> Path:
        return self.root / "node-state" / hospital

    def node_config(self, hospital: str) -> str:
        return (
            f'data-dir="{self.cohort / hospital}" hospital="{hospital}" '
            f'max-epsilon={MAX_EPSILON} delta={DELTA:g} state-dir="{self.state_dir(hospital)}" device="cpu"'
        )

    def flwr(self, *args: str, timeout: float = WAIT_S) -> subprocess.CompletedProcess[str]:
        """A Flower CLI call by the coordinator (its FLWR_HOME holds the connection)."""
        return subprocess.run(
            [_tool("flwr"), *args],
            cwd=REPO,
            env={**self.procs.env, "FLWR_HOME": str(self.coordinator_home)},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def listed_nodes(self) -> dict[str, str]:
        """node id -> status, as `flwr supernode list` reports them."""
        done = self.flwr("supernode", "list", CONNECTION, *JSON)
        assert done.returncode == 0, done.stdout + done.stderr
        payload = _json_from(done.stdout)
        assert payload["success"], payload
        return {str(node["node-id"]): node["status"] for node in payload["nodes"]}

    def start_run(
        self, name: str, out_dir: Path, overrides: str = RUN_OVERRIDES, *, resume: bool = False
    ) -> Proc:
        """`flwr run . <connection> --stream` from the repository root, as the coordinator."""
        run_config = f'overrides="{overrides}" out-dir="{out_dir}" resume={str(resume).lower()}'
        return self.procs.start(
            name,
            [_tool("flwr"), "run", ".", CONNECTION, "--run-config", run_config, "--stream"],
            cwd=REPO,
            env={"FLWR_HOME": str(self.coordinator_home)},
        )

    def context(self, *extra: Proc) -> str:
        procs = (*extra, self.superlink, *self.nodes.values())
        return "\n".join(f"--- {p.name}\n{p.tail(15)}" for p in procs)

    def start_supernode(
        self,
        name: str,
        port: int,
        *,
        hospital: str,
        tls: bool = True,
        key: Path | None = None,
        extra: tuple[str, ...] = (),
    ) -> Proc:
        argv = [_tool("flower-supernode")]
        argv += ["--root-certificates", str(self.certs.ca_crt)] if tls else ["--insecure"]
        argv += ["--superlink", self.fleet_address]
        if key is not None:
            argv += ["--auth-supernode-private-key", str(key)]
        argv += ["--node-config", self.node_config(hospital), "--host", "127.0.0.1", "--port", str(port)]
        argv += extra
        home = self.root / "node-home" / name
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self.procs.start(name, argv, cwd=self.root, env={"FLWR_HOME": str(home)})


def _json_from(stdout: str) -> dict:
    start = stdout.find("{")
    assert start >= 0, f"no JSON in CLI output:\n{stdout}"
    return json.loads(stdout[start:])


def _write_connection(home: Path, port: int, ca_crt: Path) -> None:
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    (home / "config.toml").write_text(
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "127.0.0.1:{port}"\n'
        f'root-certificates = "{ca_crt}"\n',
        encoding="utf-8",
    )


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Federation:
    root = tmp_path_factory.mktemp("deployment")
    env = {**os.environ, **FLOWER_ENV, "PATH": f"{_BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"}
    procs = Processes(root=root, env=env)
    request.addfinalizer(procs.stop_all)  # before anything starts, so a failed set-up cleans up

    certs = init_ca_and_superlink(root / "certs", ["127.0.0.1", "localhost"])
    keys = {name: create_node_keys(name, root / "keys") for name in (*HOSPITALS, "unregistered")}
    cohort = root / "cohort"
    prepare_demo_cohort(
        load_settings(None, {"federation.patients": PATIENTS, "federation.hospitals": len(HOSPITALS)}),
        cohort,
    )
    for hospital in HOSPITALS:
        root.joinpath("node-state", hospital).mkdir(parents=True, mode=0o700)

    superlink_port, *spare_ports = free_ports(8)
    coordinator_home = root / "coordinator-home"
    _write_connection(coordinator_home, superlink_port, certs.ca_crt)
    superlink = procs.start(
        "superlink",
        [
            _tool("flower-superlink"),
            "--ssl-ca-certfile",
            str(certs.ca_crt),
            "--ssl-certfile",
            str(certs.server_crt),
            "--ssl-keyfile",
            str(certs.server_key),
            "--enable-supernode-auth",
            "--database",
            str(root / "superlink.db"),
            "--host",
            "127.0.0.1",
            "--port",
            str(superlink_port),
        ],
        cwd=root,
        env={"FLWR_HOME": str(coordinator_home)},
    )
    fed = Federation(
        root=root,
        procs=procs,
        certs=certs,
        keys=keys,
        cohort=cohort,
        coordinator_home=coordinator_home,
        superlink=superlink,
        superlink_port=superlink_port,
        spare_ports=spare_ports,
    )
    wait_until_logged(superlink, SUPERLINK_READY)

    # Register the three hospitals' public keys (in parallel: each CLI call is seconds of imports).
    flwr_env = {**env, "FLWR_HOME": str(coordinator_home)}
    registrations = {
        hospital: subprocess.Popen(
            [_tool("flwr"), "supernode", "register", str(keys[hospital].public_key), CONNECTION, *JSON],
            cwd=REPO,
            env=flwr_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for hospital in HOSPITALS
    }
    for hospital, popen in registrations.items():
        out, _ = popen.communicate(timeout=WAIT_S)
        assert popen.returncode == 0, f"registering {hospital} failed:\n{out}"
        payload = _json_from(out)
        assert payload["success"], payload
        fed.node_ids[hospital] = int(payload["node-id"])

    for index, hospital in enumerate(HOSPITALS):
        fed.nodes[hospital] = fed.start_supernode(
            hospital, fed.spare_ports[index], hospital=hospital, key=keys[hospital].private_key
        )
    for proc in fed.nodes.values():
        wait_until_logged(proc, NODE_CONNECTED)
    return fed


def _readable_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # not there yet, or still being written


def _rounds_done(out_dir: Path) -> int:
    """Rounds the server has checkpointed so far (0 before the first)."""
    return int((_readable_json(out_dir / "checkpoint" / "checkpoint.json") or {}).get("rounds_done", 0))


def _ledger_entries(federation: Federation, hospital: str) -> list[dict]:
    ledger = _readable_json(federation.state_dir(hospital) / "ledger.json")
    assert ledger is not None, f"{hospital}: no readable ledger.json in its state-dir"
    return ledger["entries"]


def _await(federation: Federation, run: Proc, what: str, condition: Callable[[], bool]) -> None:
    """wait_for `condition` while `run` (a `flwr run`) runs; fail at once, with context, if it exits."""

    def check() -> bool:
        if condition():
            return True
        if run.popen.poll() is not None:
            code = run.popen.returncode
            pytest.fail(f"`{run.name}` exited ({code}) before {what}\n{federation.context(run)}")
        return False

    wait_for(what, check, context=lambda: federation.context(run))


def _tagged_with(federation: Federation, needle: bytes) -> list[int]:
    """Tagged processes whose command line contains `needle` (e.g. the ServerApp process)."""
    found = []
    for pid in federation.procs.tagged():
        with suppress(OSError):
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
    return found


@dataclass
class IncidentRun:
    out_dir: Path
    metrics: dict  # the resumed run's metrics.json
    killed_after_round: int  # rounds checkpointed when hospital-3's SuperNode was killed
    ledger_before: list[dict]  # hospital-3's ledger entries as its killed SuperNode left them
    crashed: dict  # the checkpoint the killed ServerApp left behind


@pytest.fixture(scope="module")
def incident_run(federation: Federation) -> IncidentRun:
    """One run through both incidents: hospital-3's SuperNode is killed after round 1 and the run
    goes on without it; then the ServerApp is killed, hospital-3 restarted with the same key, and
    `flwr run ... resume=true` finishes the run with all three."""
    out_dir = federation.root / "out"
    run = federation.start_run("flwr-run", out_dir)
    ledgers = [federation.state_dir(h) / "ledger.json" for h in HOSPITALS]
    # Bounded milestones: the handshake (each node charges and writes its own ledger), round 1.
    _await(federation, run, "each node's handshake (its ledger.json)", lambda: all(map(Path.exists, ledgers)))
    _await(federation, run, "round 1 checkpointed", lambda: _rounds_done(out_dir) >= 1)

    killed_at = _rounds_done(out_dir)
    node = federation.nodes["hospital-3"]
    _signal(node.popen.pid, signal.SIGKILL, group=True)  # the SuperNode and its ClientApp process
    node.popen.wait(timeout=30)
    ledger_before = _ledger_entries(federation, "hospital-3")
    _await(federation, run, "a round completed without hospital-3", lambda: _rounds_done(out_dir) > killed_at)

    serverapps = _tagged_with(federation, b"flwr-serverapp")
    assert serverapps, f"no ServerApp process found\n{federation.context(run)}"
    for pid in serverapps:
        _signal(pid, signal.SIGKILL)
    crashed = _readable_json(out_dir / "checkpoint" / "checkpoint.json") or {}
    assert 0 < crashed.get("rounds_done", 0) < ROUNDS, f"not killed mid-run: {crashed.get('rounds_done')}"
    _signal(run.popen.pid, signal.SIGTERM, group=True)
    with suppress(subprocess.TimeoutExpired):
        run.popen.wait(timeout=30)
    metrics_file = out_dir / "metrics.json"
    assert not metrics_file.exists(), "the killed run exported"

    restarted = federation.start_supernode(
        "hospital-3-restarted",
        federation.spare_ports[6],
        hospital="hospital-3",
        key=federation.keys["hospital-3"].private_key,
    )
    federation.nodes["hospital-3"] = restarted
    wait_until_logged(restarted, NODE_CONNECTED)  # online before the resume looks for the nodes

    again = federation.start_run("flwr-run-resume", out_dir, resume=True)
    _await(
        federation, again, "the resumed run's metrics.json", lambda: _readable_json(metrics_file) is not None
    )
    try:
        again.popen.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`flwr run --stream` did not return after the export\n{federation.context(again)}")
    assert again.popen.returncode == 0, federation.context(again)
    return IncidentRun(
        out_dir=out_dir,
        metrics=_readable_json(metrics_file) or {},
        killed_after_round=killed_at,
        ledger_before=ledger_before,
        crashed=crashed,
    )


# --- tests ----------------------------------------------------------------------------------


@pytest.mark.deployment
def test_registered_tls_nodes_are_online(federation: Federation) -> None:
    listed = federation.listed_nodes()
    assert set(listed) == {str(i) for i in federation.node_ids.values()}
    assert set(listed.values()) == {"online"}


@pytest.mark.deployment
def test_unregistered_node_is_refused(federation: Federation) -> None:
    key = federation.keys["unregistered"]
    node = federation.start_supernode(
        "unregistered", federation.spare_ports[3], hospital="hospital-1", key=key.private_key
    )
    # The SuperLink logs the refused key as its SubjectPublicKeyInfo PEM (one line, '\n' escaped).
    public_pem = (
        serialization.load_ssh_public_key(key.public_key.read_bytes())
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    first_b64_line = public_pem.splitlines()[1]

    def refused() -> bool:
        return any(
            UNKNOWN_KEY in line and first_b64_line in line
            for line in federation.superlink.text().splitlines()
        )

    wait_for("the SuperLink to refuse the unregistered key", refused, context=federation.superlink.tail)
    # Flower 1.41 gives up at once (exit code 305); allow a little time to get there.
    with suppress(subprocess.TimeoutExpired):
        node.popen.wait(timeout=30)
    log = node.text()
    assert NODE_CONNECTED not in log, log
    if node.popen.returncode is not None:
        assert node.popen.returncode != 0, log
        assert NODE_ACTIVATION_REFUSED in log, log
    assert set(federation.listed_nodes()) == {str(i) for i in federation.node_ids.values()}


@pytest.mark.deployment
def test_plaintext_node_cannot_connect_to_tls_superlink(federation: Federation) -> None:
    # Bounded retries so the refusal ends in an exit rather than an endless back-off.
    node = federation.start_supernode(
        "plaintext",
        federation.spare_ports[4],
        hospital="hospital-2",
        tls=False,
        extra=("--max-retries", "3", "--max-wait-time", "30"),
    )
    try:
        node.popen.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"plaintext SuperNode neither connected nor gave up:\n{node.tail()}")
    log = node.text()
    assert node.popen.returncode != 0, log
    assert NODE_CONNECTED not in log, log
    assert NODE_CONNECT_FAILED in log, log
    assert set(federation.listed_nodes()) == {str(i) for i in federation.node_ids.values()}


@pytest.mark.deployment
def test_registered_key_is_not_sent_over_plaintext(federation: Federation) -> None:
    node = federation.start_supernode(
        "plaintext-with-key",
        federation.spare_ports[5],
        hospital="hospital-3",
        tls=False,
        key=federation.keys["hospital-3"].private_key,
    )
    try:
        node.popen.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"SuperNode with --insecure and a key kept running:\n{node.tail()}")
    assert node.popen.returncode != 0
    assert PLAINTEXT_WITH_KEY in node.text(), node.tail()
    assert NODE_CONNECTED not in node.text()


# --- the incident run: its export, its ledgers, the dropout, the resume ----------------------


@pytest.mark.deployment
def test_tls_authenticated_federation_exports(federation: Federation, incident_run: IncidentRun) -> None:
    metrics = incident_run.metrics
    assert (incident_run.out_dir / "metrics.json").is_file()
    assert (incident_run.out_dir / "bundle" / "model_card.json").is_file()
    assert sorted(h["hospital"] for h in metrics["hospitals"]) == list(HOSPITALS)
    assert [r["round"] for r in metrics["rounds"]] == list(range(1, ROUNDS + 1))
    assert all(r["aggregated"] for r in metrics["rounds"]), metrics["rounds"]
    assert sorted(metrics["rounds"][0]["hospitals"]) == list(HOSPITALS)
    assert set(federation.listed_nodes()) == {str(i) for i in federation.node_ids.values()}


@pytest.mark.deployment
def test_ledger_persists_in_state_dir(federation: Federation, incident_run: IncidentRun) -> None:
    reported = {h["hospital"]: h for h in incident_run.metrics["hospitals"]}
    for hospital in HOSPITALS:
        ledger_file = federation.state_dir(hospital) / "ledger.json"
        assert ledger_file.is_file(), f"{hospital}: no ledger in its state-dir"
        stored = json.loads(ledger_file.read_text(encoding="utf-8"))
        ledger = PrivacyLedger.from_json(
            ledger_file.read_text(encoding="utf-8"), max_epsilon=MAX_EPSILON, delta=DELTA
        )
        assert stored["entries"], f"{hospital}: empty ledger"
        assert stored["entries"][-1]["epsilon_after"] == pytest.approx(
            reported[hospital]["epsilon"], rel=1e-9
        )
        assert ledger.spent() == pytest.approx(reported[hospital]["epsilon"], rel=1e-6)
        assert 0 < ledger.spent() <= RUN_MAX_EPSILON + 1e-9
        assert len(stored["entries"]) >= 2, f"{hospital}: expected handshake + training entries"


@pytest.mark.deployment
def test_node_killed_mid_round_does_not_stall_and_rejoins(incident_run: IncidentRun) -> None:
    rounds = incident_run.metrics["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert all(r["aggregated"] for r in rounds), rounds
    without = [r["round"] for r in rounds if "hospital-3" not in r["hospitals"]]
    assert without, "hospital-3 took part in every round although it was killed"
    first_missed = without[0]
    assert first_missed == incident_run.killed_after_round + 1
    # the round it missed went on with the two others (the quorum), as did every round up to the crash
    assert sorted(rounds[first_missed - 1]["hospitals"]) == ["hospital-1", "hospital-2"]
    k = incident_run.crashed["rounds_done"]
    assert all("hospital-3" not in r["hospitals"] for r in rounds[first_missed - 1 : k]), rounds
    # ... and the restarted node (same key, same node id) was sent a later round and answered it
    assert any("hospital-3" in r["hospitals"] for r in rounds[k:]), rounds


@pytest.mark.deployment
def test_restarted_node_keeps_its_ledger(federation: Federation, incident_run: IncidentRun) -> None:
    after = _ledger_entries(federation, "hospital-3")
    before = incident_run.ledger_before
    assert after[: len(before)] == before, "the restart lost or rewrote earlier charges"
    assert len(after) > len(before), "the restarted node charged nothing for its later rounds"
    spent = [e["epsilon_after"] for e in after]
    assert spent == sorted(spent), "epsilon went down across the restart"
    reported = {h["hospital"]: h["epsilon"] for h in incident_run.metrics["hospitals"]}
    assert spent[-1] == pytest.approx(reported["hospital-3"], rel=1e-9)
    assert spent[-1] <= RUN_MAX_EPSILON + 1e-9


@pytest.mark.deployment
def test_server_killed_after_round_k_resumes_at_k_plus_1(incident_run: IncidentRun) -> None:
    crashed, metrics = incident_run.crashed, incident_run.metrics
    k = crashed["rounds_done"]
    assert metrics["resumed"] is True
    assert metrics["federation_id"] == crashed["federation_id"]
    rounds = metrics["rounds"]
    # every round exactly once: 1..k from before the crash, k+1..ROUNDS after the resume
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    before = crashed["round_logs"][:k]
    assert [r["hospitals"] for r in rounds[:k]] == [
        [a["hospital"] for a in log["accepted"]] for log in before
    ]
    # the ledger summaries of the checkpoint only grow after the resume (each node's own ledger)
    final = {h["hospital"]: h["epsilon"] for h in metrics["hospitals"]}
    for hospital, epsilon in crashed["ledger_summaries"].items():
        assert final[hospital] >= epsilon - 1e-9
    assert all(r["aggregated"] for r in rounds)
    # hospital-3 was restarted before the resume: every resumed round had all three
    assert all(sorted(r["hospitals"]) == list(HOSPITALS) for r in rounds[k:]), rounds
    for hospital in metrics["hospitals"]:
        assert 0 < hospital["epsilon"] <= RUN_MAX_EPSILON + 1e-9
