"""Real Flower 1.41 deployment on loopback: TLS SuperLink, authenticated SuperNodes, one run.

One module-scoped federation (a SuperLink with `--enable-supernode-auth` and three registered
hospitals) serves every test; the run itself is a second module fixture so the cheap refusal
tests go first. Every process is started in its own session and torn down, with everything it
spawned, in a finalizer. See docs/operating-guide.md for the same commands by hand.
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
# The runs of this module share the nodes and so their ledgers (one per hospital, across runs,
# as on a real node): each run may only lower the node's max epsilon, so each later run is
# allowed a little more than the one before, and never more than the node's 5.
RUN_OVERRIDES = " ".join(["stages.0.rounds=1", "privacy.max_epsilon=1.5", *TINY_RUN])
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


@dataclass
class RunResult:
    out_dir: Path
    metrics: dict
    log: Proc


@pytest.fixture(scope="module")
def finished_run(federation: Federation) -> RunResult:
    out_dir = federation.root / "out"
    run = federation.start_run("flwr-run", out_dir)

    def context() -> str:
        return federation.context(run)

    def reached(condition: Callable[[], bool]) -> Callable[[], bool]:
        def check() -> bool:
            if condition():
                return True
            if run.popen.poll() is not None:
                pytest.fail(f"`flwr run` exited ({run.popen.returncode}) early\n{context()}")
            return False

        return check

    ledgers = [federation.state_dir(h) / "ledger.json" for h in HOSPITALS]
    metrics_file = out_dir / "metrics.json"
    # Three bounded milestones, each node's own ledger marking the first two: the handshake
    # (each node charges and writes its ledger), the training round (each rewrites it), then
    # the server's export.
    wait_for(
        "every node's handshake (ledger.json written)",
        reached(lambda: all(p.exists() for p in ledgers)),
        context=context,
    )
    after_handshake = [p.read_bytes() for p in ledgers]
    wait_for(
        "every node's training round (ledger.json rewritten)",
        reached(lambda: all(p.read_bytes() != b for p, b in zip(ledgers, after_handshake, strict=True))),
        context=context,
    )
    wait_for("metrics.json", reached(lambda: _readable_json(metrics_file) is not None), context=context)
    try:
        run.popen.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`flwr run --stream` did not return after the export\n{context()}")
    assert run.popen.returncode == 0, context()
    return RunResult(out_dir=out_dir, metrics=_readable_json(metrics_file), log=run)


def _readable_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # not there yet, or still being written


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


@pytest.mark.deployment
def test_tls_authenticated_federation_exports(federation: Federation, finished_run: RunResult) -> None:
    metrics = finished_run.metrics
    assert (finished_run.out_dir / "metrics.json").is_file()
    assert (finished_run.out_dir / "bundle" / "model_card.json").is_file()
    assert sorted(h["hospital"] for h in metrics["hospitals"]) == list(HOSPITALS)
    assert len(metrics["rounds"]) == 1
    assert metrics["rounds"][0]["aggregated"] is True
    assert sorted(metrics["rounds"][0]["hospitals"]) == list(HOSPITALS)
    assert set(federation.listed_nodes()) == {str(i) for i in federation.node_ids.values()}


@pytest.mark.deployment
def test_ledger_persists_in_state_dir(federation: Federation, finished_run: RunResult) -> None:
    reported = {h["hospital"]: h for h in finished_run.metrics["hospitals"]}
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
        assert 0 < ledger.spent() <= MAX_EPSILON + 1e-9
        assert len(stored["entries"]) >= 2, f"{hospital}: expected handshake + training entries"


# --- dropout and resume (later runs on the same nodes; see RUN_OVERRIDES on their budgets) ----

DROPOUT_OVERRIDES = " ".join(
    ["stages.0.rounds=6", "federation.min_replies=2", "privacy.max_epsilon=3.0", *TINY_RUN]
)
RESUME_OVERRIDES = " ".join(["stages.0.rounds=3", "privacy.max_epsilon=4.5", *TINY_RUN])


def _progress(out_dir: Path) -> dict | None:
    """The server's last checkpoint record, once one is written."""
    return _readable_json(out_dir / "checkpoint" / "checkpoint.json")


def _finish(federation: Federation, run: Proc, out_dir: Path, *, after: float = 0.0) -> dict:
    """Wait for the run's own metrics.json (newer than `after`) and for `flwr run` to return."""
    metrics_file = out_dir / "metrics.json"

    def exported() -> bool:
        if metrics_file.exists() and metrics_file.stat().st_mtime > after and _readable_json(metrics_file):
            return True
        if run.popen.poll() is not None:
            pytest.fail(
                f"`flwr run` exited ({run.popen.returncode}) before the export\n{federation.context(run)}"
            )
        return False

    wait_for("the run's metrics.json", exported, context=lambda: federation.context(run))
    with suppress(subprocess.TimeoutExpired):
        run.popen.wait(timeout=60)
    return _readable_json(metrics_file) or {}


def _kill_tree(pids: list[int]) -> None:
    for pid in pids:
        _signal(pid, signal.SIGKILL)


def _tagged_with(federation: Federation, needle: bytes) -> list[int]:
    """Tagged processes whose command line contains `needle` (e.g. the ServerApp process)."""
    found = []
    for pid in federation.procs.tagged():
        with suppress(OSError):
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
    return found


@pytest.fixture(scope="module")
def dropout_run(federation: Federation, finished_run: RunResult) -> dict:
    """hospital-3's SuperNode is killed mid-round and restarted two rounds later; the run goes on."""
    out_dir = federation.root / "out-dropout"
    ledger_file = federation.state_dir("hospital-3") / "ledger.json"
    ledger_before = json.loads(ledger_file.read_text(encoding="utf-8"))["entries"]
    run = federation.start_run("flwr-run-dropout", out_dir, DROPOUT_OVERRIDES)
    context = lambda: federation.context(run)  # noqa: E731
    wait_for(
        "round 1 checkpointed", lambda: (_progress(out_dir) or {}).get("rounds_done", 0) >= 1, context=context
    )
    killed_at = (_progress(out_dir) or {})["rounds_done"]
    node = federation.nodes["hospital-3"]
    _signal(node.popen.pid, signal.SIGKILL, group=True)  # the SuperNode and its ClientApp process
    node.popen.wait(timeout=30)
    wait_for(
        "a round completed without hospital-3",
        lambda: (_progress(out_dir) or {}).get("rounds_done", 0) >= killed_at + 1,
        context=context,
    )
    federation.nodes["hospital-3"] = federation.start_supernode(
        "hospital-3-restarted",
        federation.spare_ports[6],
        hospital="hospital-3",
        key=federation.keys["hospital-3"].private_key,
    )
    metrics = _finish(federation, run, out_dir)
    return {"metrics": metrics, "killed_after_round": killed_at, "ledger_before": ledger_before}


@pytest.mark.deployment
def test_node_killed_mid_round_does_not_stall_and_rejoins(dropout_run: dict) -> None:
    rounds = dropout_run["metrics"]["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, 7))
    assert all(r["aggregated"] for r in rounds), rounds
    without = [r["round"] for r in rounds if "hospital-3" not in r["hospitals"]]
    assert without, "hospital-3 took part in every round although it was killed"
    first_missed = without[0]
    assert first_missed == dropout_run["killed_after_round"] + 1
    # the round it missed went on with the two others (the quorum)
    assert sorted(rounds[first_missed - 1]["hospitals"]) == ["hospital-1", "hospital-2"]
    # ... and the restarted node (same key, same node id) was sent a later round and answered it
    assert any("hospital-3" in r["hospitals"] for r in rounds[first_missed:]), rounds


@pytest.mark.deployment
def test_restarted_node_keeps_its_ledger(federation: Federation, dropout_run: dict) -> None:
    ledger_file = federation.state_dir("hospital-3") / "ledger.json"
    after = json.loads(ledger_file.read_text(encoding="utf-8"))["entries"]
    before = dropout_run["ledger_before"]
    assert after[: len(before)] == before, "the restart lost or rewrote earlier charges"
    spent = [e["epsilon_after"] for e in after]
    assert spent == sorted(spent), "epsilon went down across the restart"
    reported = {h["hospital"]: h["epsilon"] for h in dropout_run["metrics"]["hospitals"]}
    assert spent[-1] == pytest.approx(reported["hospital-3"], rel=1e-9)
    assert spent[-1] <= 3.0 + 1e-9


@pytest.fixture(scope="module")
def resumed_run(federation: Federation, dropout_run: dict) -> dict:
    """The ServerApp process is killed after round 1; `flwr run ... resume=true` finishes the run."""
    out_dir = federation.root / "out-resume"
    run = federation.start_run("flwr-run-crash", out_dir, RESUME_OVERRIDES)
    context = lambda: federation.context(run)  # noqa: E731
    wait_for(
        "round 1 checkpointed", lambda: (_progress(out_dir) or {}).get("rounds_done", 0) >= 1, context=context
    )
    serverapps = _tagged_with(federation, b"flwr-serverapp")
    assert serverapps, f"no ServerApp process found\n{context()}"
    _kill_tree(serverapps)
    crashed = _progress(out_dir) or {}
    assert crashed["rounds_done"] < 3, "the run finished before it could be killed"
    _signal(run.popen.pid, signal.SIGTERM, group=True)
    with suppress(subprocess.TimeoutExpired):
        run.popen.wait(timeout=30)
    assert not (out_dir / "metrics.json").exists()
    started = time.time()
    again = federation.start_run("flwr-run-resume", out_dir, RESUME_OVERRIDES, resume=True)
    metrics = _finish(federation, again, out_dir, after=started)
    return {"metrics": metrics, "crashed": crashed}


@pytest.mark.deployment
def test_server_killed_after_round_k_resumes_at_k_plus_1(resumed_run: dict) -> None:
    crashed, metrics = resumed_run["crashed"], resumed_run["metrics"]
    k = crashed["rounds_done"]
    assert metrics["resumed"] is True
    assert metrics["federation_id"] == crashed["federation_id"]
    rounds = metrics["rounds"]
    # every round exactly once: 1..k from before the crash, k+1..3 after the resume
    assert [r["round"] for r in rounds] == [1, 2, 3]
    before = crashed["round_logs"][:k]
    assert [r["hospitals"] for r in rounds[:k]] == [
        [a["hospital"] for a in log["accepted"]] for log in before
    ]
    # the ledger summaries of the checkpoint only grow after the resume (each node's own ledger)
    final = {h["hospital"]: h["epsilon"] for h in metrics["hospitals"]}
    for hospital, epsilon in crashed["ledger_summaries"].items():
        assert final[hospital] >= epsilon - 1e-9
    assert all(r["aggregated"] for r in rounds)
    assert all(sorted(r["hospitals"]) == list(HOSPITALS) for r in rounds[k:])
    for hospital in metrics["hospitals"]:
        assert 0 < hospital["epsilon"] <= 4.5 + 1e-9
