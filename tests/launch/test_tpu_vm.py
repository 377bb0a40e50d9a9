"""launch/tpu_vm.sh against a fake gcloud that records its argv, and fake workers.

Every gcloud argv is checked exactly. What the script sends to the workers (``--command``)
is run with ``bash -c`` on fake workers (own home, hostname, venv tools), so the tests see
the argv the program would get there. No JAX here: these run in about a few seconds.
"""

import contextlib
import os
import re
import shlex
import signal
import subprocess
import tarfile
import time

import pytest

from tests.launch.fakes import (
    REPO,
    TRICKY_ARGS,
    FakeWorker,
    clean_env,
    command_of,
    read_calls,
    write_recorder,
)

SCRIPT = REPO / "launch" / "tpu_vm.sh"
TPU_VM = ["compute", "tpus", "tpu-vm"]
QR = ["compute", "tpus", "queued-resources"]
WHERE = ["--zone=us-central2-b", "--project=my-proj"]


@pytest.fixture
def gcloud(tmp_path):
    """Runs the script with a recording fake gcloud first on PATH; returns (run, calls)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "gcloud_calls.jsonl"
    write_recorder(bin_dir, "gcloud", log)

    def run(*args: str, **settings: str) -> subprocess.CompletedProcess:
        env = clean_env(bin_dir, **settings)
        return subprocess.run(
            ["bash", str(SCRIPT), *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def calls() -> list[list[str]]:
        return [c["argv"] for c in read_calls(log)]

    return run, calls


SETTINGS = {"TPU_NAME": "pdm-v4", "ZONE": "us-central2-b", "PROJECT": "my-proj"}


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr
    return result


# --- create / delete / status ------------------------------------------------------------


def test_create_tpu_vm_with_flags(gcloud):
    run, calls = gcloud
    ok(
        run(
            "create",
            "--tpu_name=pdm-v4",
            "--zone=us-central2-b",
            "--project=my-proj",
            "--accelerator_type=v4-32",
            "--spot",
        )
    )
    assert calls() == [
        [
            *TPU_VM,
            "create",
            "pdm-v4",
            *WHERE,
            "--accelerator-type=v4-32",
            "--version=tpu-ubuntu2204-base",
            "--spot",
        ]
    ]


def test_create_queued_resource_from_the_environment(gcloud):
    run, calls = gcloud
    ok(run("create", ACCELERATOR_TYPE="v5p-64", QUEUED_RESOURCE="1", SPOT="1", **SETTINGS))
    assert calls() == [
        [
            *QR,
            "create",
            "pdm-v4",
            *WHERE,
            "--node-id=pdm-v4",
            "--accelerator-type=v5p-64",
            "--runtime-version=v2-alpha-tpuv5",
            "--spot",
        ]
    ]


@pytest.mark.parametrize(
    "accelerator, runtime",
    [
        ("v3-32", "tpu-ubuntu2204-base"),
        ("v5litepod-8", "v2-alpha-tpuv5-lite"),
        ("v5e-16", "v2-alpha-tpuv5-lite"),
        ("v6e-16", "v2-alpha-tpuv6e"),
    ],
)
def test_create_picks_the_runtime_of_the_generation(gcloud, accelerator, runtime):
    run, calls = gcloud
    ok(run("create", f"--accelerator_type={accelerator}", "--preemptible", **SETTINGS))
    assert calls() == [
        [
            *TPU_VM,
            "create",
            "pdm-v4",
            *WHERE,
            f"--accelerator-type={accelerator}",
            f"--version={runtime}",
            "--preemptible",
        ]
    ]


def test_flags_override_the_environment(gcloud):
    run, calls = gcloud
    ok(
        run(
            "create",
            "--zone=europe-west4-a",
            "--runtime_version=v2-alpha-tpuv5-lite",
            "--reserved",
            ACCELERATOR_TYPE="v5litepod-8",
            RUNTIME_VERSION="ignored",
            **SETTINGS,
        )
    )
    assert calls() == [
        [
            *TPU_VM,
            "create",
            "pdm-v4",
            "--zone=europe-west4-a",
            "--project=my-proj",
            "--accelerator-type=v5litepod-8",
            "--version=v2-alpha-tpuv5-lite",
            "--reserved",
        ]
    ]


def test_delete_and_status(gcloud):
    run, calls = gcloud
    ok(run("delete", **SETTINGS))
    ok(run("delete", "--queued_resource", "--yes", **SETTINGS))
    ok(run("status", **SETTINGS))
    ok(run("status", QUEUED_RESOURCE="true", TPU_NAME="pdm-v4", ZONE="us-central2-b"))
    assert calls() == [
        [*TPU_VM, "delete", "pdm-v4", *WHERE],
        [*QR, "delete", "pdm-v4", *WHERE, "--force", "--quiet"],
        [*TPU_VM, "describe", "pdm-v4", *WHERE],
        [*QR, "describe", "pdm-v4", "--zone=us-central2-b"],  # no PROJECT: gcloud's own
    ]


# --- setup, run, logs, stop on fake workers ------------------------------------------------


def test_setup_copies_head_installs_and_mounts_on_every_worker(gcloud, tmp_path):
    run, calls = gcloud
    received = tmp_path / "received"
    received.mkdir()
    result = ok(
        run(
            "setup",
            "--gcs_bucket=gs://my-bucket/pdm",
            "--mount_point=" + str(tmp_path / "gcs"),
            FAKE_SCP_DIR=str(received),
            **SETTINGS,
        )
    )
    scp, ssh = calls()
    sha = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    archive = scp[4]
    assert scp == [*TPU_VM, "scp", archive, "pdm-v4:pdm_jax_src.tar.gz", *WHERE, "--worker=all"]
    assert archive.endswith(f"pdm_jax_src-{sha}.tar.gz") and not os.path.exists(archive)
    assert "git -C" in result.stderr and "archive" in result.stderr  # the local steps are shown
    assert ssh[:5] == [*TPU_VM, "ssh", "pdm-v4"] and ssh[5:8] == [*WHERE, "--worker=all"]
    with tarfile.open(received / os.path.basename(archive)) as tar:  # HEAD, as committed
        assert (
            tar.extractfile("constraints.txt").read()
            == subprocess.run(
                ["git", "show", "HEAD:constraints.txt"], cwd=REPO, capture_output=True
            ).stdout
        )
        assert "pdm_jax/main.py" in tar.getnames()

    for host in ("t1v-w-0", "t1v-w-1"):  # the one command, as each worker runs it
        worker = FakeWorker(tmp_path / "workers", host)
        (worker.home / "pdm_jax").mkdir()
        (worker.home / "pdm_jax" / "stale.py").write_text("")  # from an earlier setup
        os.link(received / os.path.basename(archive), worker.home / "pdm_jax_src.tar.gz")
        done = worker.ssh(command_of(ssh))
        assert done.returncode == 0, done.stderr
        assert f"{host}: pdm_jax ready, jax 0.10.2" in done.stdout
        assert f"{host}: mounted gs://my-bucket/pdm at {tmp_path / 'gcs'}" in done.stdout
        code = worker.home / "pdm_jax"
        assert (code / "pyproject.toml").exists() and not (code / "stale.py").exists()
        assert not (worker.home / "pdm_jax_src.tar.gz").exists()
        pips = worker.calls("pip")
        venv = str(worker.home / "pdm_jax_venv")
        assert [c["argv"] for c in pips] == [
            ["install", "-q", "--upgrade", "pip"],
            ["install", "-q", "-c", "constraints.txt", "-e", ".", "jax[tpu]"],
        ]
        assert all(c["cwd"] == str(code) and c["venv"] == venv for c in pips)
        assert (worker.home / "gcsfuse_args").read_text().split() == [
            "--implicit-dirs",
            "--only-dir=pdm",
            "my-bucket",
            str(tmp_path / "gcs"),
        ]


def test_setup_clones_a_branch_instead(gcloud, tmp_path):
    run, calls = gcloud
    ok(
        run(
            "setup",
            "--repo_url=https://example.com/me/pdm_jax.git",
            "--branch=my branch",
            "--python=python3.11",
            **SETTINGS,
        )
    )
    (ssh,) = calls()  # nothing copied
    assert ssh[:8] == [*TPU_VM, "ssh", "pdm-v4", *WHERE, "--worker=all"]
    worker = FakeWorker(tmp_path / "workers", "t1v-w-0")
    done = worker.ssh(command_of(ssh))
    assert done.returncode == 0, done.stderr
    assert (worker.home / "git_args").read_text().split("\n")[0] == (
        "clone --depth=1 --branch=my branch https://example.com/me/pdm_jax.git pdm_jax"
    )
    assert [c["argv"][-1] for c in worker.calls("pip")] == ["pip", "jax[tpu]"]
    assert not (worker.home / "gcsfuse_args").exists()  # no bucket, no mount


def test_run_gives_every_worker_the_same_argv_with_overrides_intact(gcloud, tmp_path):
    run, calls = gcloud
    ok(
        run(
            "run",
            "--run_name=exp-1",
            "--env=PDM_TEST_FLAGS=--a=1 --b='2'",
            "--",
            *TRICKY_ARGS,
            **SETTINGS,
        )
    )
    (ssh,) = calls()  # one call, all workers
    assert ssh[:8] == [*TPU_VM, "ssh", "pdm-v4", *WHERE, "--worker=all"]
    for host in ("t1v-w-0", "t1v-w-1"):
        worker = FakeWorker(tmp_path / "workers", host)
        worker.ssh(setup_command(tmp_path))
        started = worker.ssh(command_of(ssh))
        assert started.returncode == 0, started.stderr
        assert f"{host}: started exp-1" in started.stdout
        record = worker.wait_for_run()
        assert record["argv"] == ["-u", "-m", "pdm_jax.main", "--distributed", *TRICKY_ARGS]
        assert record["cwd"] == str(worker.home / "pdm_jax")
        assert record["venv"] == str(worker.home / "pdm_jax_venv")
        assert record["env"] == {"PDM_TEST_FLAGS": "--a=1 --b='2'"}
        assert record["pid"] == record["pgid"]  # its own process group: stop reaches it all
        log_dir = worker.home / "pdm_logs" / "exp-1"
        assert int((log_dir / f"{host}.pid").read_text()) == record["pid"]
        wait_for_text(log_dir / f"{host}.log", f"fake python on {host}: step 1")


def test_run_other_module_and_single_worker(gcloud, tmp_path):
    run, calls = gcloud
    args = ["--config=configs/pdm.py:two_stream", "--what=train_step", "--batch_size=64"]
    ok(
        run(
            "run",
            "--module=pdm_jax.benchmark",
            "--worker=0",
            "--run_name=bench",
            "--",
            *args,
            **SETTINGS,
        )
    )
    ok(run("run", "--run_name=own", "--", "--distributed=false", "--config=c.py", **SETTINGS))
    bench, own = calls()
    assert "--worker=0" in bench
    worker = FakeWorker(tmp_path / "workers", "t1v-w-0")
    worker.ssh(setup_command(tmp_path))
    assert worker.ssh(command_of(bench)).returncode == 0
    assert worker.wait_for_run()["argv"] == ["-u", "-m", "pdm_jax.benchmark", *args]
    other = FakeWorker(tmp_path / "workers", "t1v-w-1")
    other.ssh(setup_command(tmp_path))
    assert other.ssh(command_of(own)).returncode == 0
    assert other.wait_for_run()["argv"] == [
        "-u",
        "-m",
        "pdm_jax.main",
        "--distributed=false",
        "--config=c.py",
    ]


def test_run_is_refused_while_one_is_going_and_stop_sends_sigterm(gcloud, tmp_path):
    run, calls = gcloud
    ok(run("run", "--run_name=long", "--", "--config=c.py", **SETTINGS))
    ok(run("stop", "--run_name=long", **SETTINGS))
    ok(run("stop", "--signal=KILL", **SETTINGS))
    start, stop, stop_all = calls()
    assert stop[:8] == [*TPU_VM, "ssh", "pdm-v4", *WHERE, "--worker=all"]
    assert "kill -s KILL" in command_of(stop_all) and "pdm_logs/*/*.pid" in command_of(stop_all)
    worker = FakeWorker(tmp_path / "workers", "t1v-w-0")
    worker.ssh(setup_command(tmp_path))
    assert worker.ssh(command_of(start), FAKE_PYTHON_WAIT="1").returncode == 0
    pid = worker.wait_for_run()["pid"]
    try:
        again = worker.ssh(command_of(start))
        assert again.returncode == 1
        assert "a run is still going (~/pdm_logs/long/t1v-w-0.pid)" in again.stderr
        stopped = worker.ssh(command_of(stop))
        assert stopped.returncode == 0, stopped.stderr
        assert "t1v-w-0: sent SIGTERM to ~/pdm_logs/long/t1v-w-0.pid" in stopped.stdout
        wait_for_text(worker.home / "terminated", str(int(signal.SIGTERM)))
        wait_for_exit(pid)
        assert "nothing running" in worker.ssh(command_of(stop)).stdout
    finally:
        kill_group(pid)


def test_logs_tail_one_worker_and_fetch_all(gcloud, tmp_path):
    run, calls = gcloud
    fetch_dir = tmp_path / "fetched logs"
    ok(run("logs", "--run_name=exp-1", "--worker=3", "--lines=2", **SETTINGS))
    ok(run("logs", "--follow", **SETTINGS))
    ok(run("logs", "--run_name=exp-1", f"--fetch={fetch_dir}", **SETTINGS))
    tail, follow, fetch = calls()
    assert tail[:8] == [*TPU_VM, "ssh", "pdm-v4", *WHERE, "--worker=3"]
    assert follow[7] == "--worker=0" and "tail -n 100 -F" in command_of(follow)
    assert fetch == [
        *TPU_VM,
        "scp",
        "--recurse",
        "pdm-v4:pdm_logs/exp-1",
        str(fetch_dir),
        *WHERE,
        "--worker=all",
    ]
    assert fetch_dir.is_dir()
    worker = FakeWorker(tmp_path / "workers", "t1v-w-3")
    log = worker.home / "pdm_logs" / "exp-1" / "t1v-w-3.log"
    log.parent.mkdir(parents=True)
    log.write_text("".join(f"line {i}\n" for i in range(10)))
    shown = worker.ssh(command_of(tail))
    assert shown.stdout.splitlines() == [
        "==> t1v-w-3:~/pdm_logs/exp-1/t1v-w-3.log <==",
        "line 8",
        "line 9",
    ]
    missing = FakeWorker(tmp_path / "workers", "t1v-w-4").ssh(command_of(tail))
    assert missing.returncode == 1 and "no log under ~/pdm_logs/exp-1" in missing.stderr


def test_ssh(gcloud):
    run, calls = gcloud
    ok(run("ssh", **SETTINGS))
    ok(run("ssh", "--worker=all", "--", "ls", "-l", "pdm_logs", **SETTINGS))
    assert calls() == [
        [*TPU_VM, "ssh", "pdm-v4", *WHERE, "--worker=0"],
        [*TPU_VM, "ssh", "pdm-v4", *WHERE, "--worker=all", "--command=ls -l pdm_logs"],
    ]


# --- dry run, help, errors -----------------------------------------------------------------

EVERY_COMMAND = [
    ("create", "--accelerator_type=v4-32", "--spot"),
    ("create", "--accelerator_type=v4-32", "--queued_resource"),
    ("setup", "--repo_url=https://example.com/pdm_jax.git", "--gcs_bucket=gs://b"),
    ("run", "--run_name=r", "--", *TRICKY_ARGS),
    ("logs", "--worker=1"),
    ("ssh", "--", "uptime"),
    ("stop",),
    ("delete", "--yes"),
    ("status", "--queued_resource"),
]


@pytest.mark.parametrize("args", EVERY_COMMAND, ids=lambda args: " ".join(args[:2]))
def test_dry_run_prints_exactly_what_runs_and_calls_nothing(gcloud, args):
    run, calls = gcloud
    printed = ok(run(args[0], "--dry_run", *args[1:], **SETTINGS))
    assert calls() == []
    ok(run(*args, **SETTINGS))
    assert [shlex.split(line) for line in command_lines(printed.stdout)] == [
        ["gcloud", *argv] for argv in calls()
    ]


def test_dry_run_of_setup_shows_the_local_steps(gcloud):
    run, calls = gcloud
    printed = ok(run("setup", DRY_RUN="1", **SETTINGS)).stdout
    lines = [shlex.split(line) for line in command_lines(printed)]
    assert [line[:3] for line in lines] == [
        ["git", "-C", str(REPO)],
        ["gcloud", "compute", "tpus"],
        ["rm", "-f", lines[0][-2].removeprefix("--output=")],
        ["gcloud", "compute", "tpus"],
    ]
    assert lines[0][3:] == ["archive", "--format=tar.gz", lines[0][5], "HEAD"]
    assert calls() == []


def test_help_lists_every_command_flag_and_variable(gcloud):
    run, calls = gcloud
    text = ok(run("--help")).stdout
    script = SCRIPT.read_text()
    flags = re.search(r"flag_commands\(\) \{(.*?)\n\}", script, re.S).group(1)
    names = re.findall(r"([a-z_]+)(?= \||\))", flags.split("*)")[0])
    assert len(names) > 20
    for name in names:
        assert f"--{name}" in text, name
    for variable in re.findall(r"^([A-Z_]+)=.*\$\{\1:-", script, re.M):
        if variable != "REPO_ROOT":
            assert f"[{variable}" in text, variable
    for command in ("create", "setup", "run", "logs", "ssh", "stop", "delete", "status"):
        assert f"\n  {command} " in text
    assert calls() == []


@pytest.mark.parametrize(
    "args, settings, message",
    [
        (("create", "--accelerator_type=v4-32"), {"ZONE": "z"}, "--tpu_name=NAME or set TPU_NAME"),
        (
            ("run", "--", "--config=c"),
            {"TPU_NAME": "t"},
            "--zone=ZONE (e.g. us-central2-b) or set ZONE",
        ),
        (
            ("create",),
            SETTINGS,
            "--accelerator_type (e.g. v4-32, v5litepod-8, v5p-64) or set ACCELERATOR_TYPE",
        ),
        (
            ("create", "--accelerator_type=v9z-8"),
            SETTINGS,
            "no default runtime version for v9z-8: pass --runtime_version",
        ),
        (("create", "--accelerator_type=tpu"), SETTINGS, "is not a TPU type such as v4-32"),
        (("create", "--accelerator_type=v4-8", "--spot", "--preemptible"), SETTINGS, "pick one"),
        (
            ("create", "--accelerator_type=v4-8", "--queued_resource", "--preemptible"),
            SETTINGS,
            "take --spot",
        ),
        (("run",), SETTINGS, "nothing to run: give the program's flags after --"),
        (
            ("run", "--spot", "--", "--config=c"),
            SETTINGS,
            "--spot does not apply to 'run' (it applies to: create)",
        ),
        (("run", "--env=1X=2", "--", "--config=c"), SETTINGS, "--env=1X=2: use --env=KEY=VALUE"),
        (("run", "--run_name=a/b", "--", "--config=c"), SETTINGS, "--run_name=a/b: use letters"),
        (
            ("run", "--remote_dir=~/pdm", "--", "--config=c"),
            SETTINGS,
            "relative to the workers' home",
        ),
        (
            ("run", "--worker=two", "--", "--config=c"),
            SETTINGS,
            "--worker=two: give a worker number",
        ),
        (("setup", "--branch=main"), SETTINGS, "--branch needs --repo_url"),
        (("setup", "--mount_point=gcs"), SETTINGS, "give an absolute path"),
        (("logs", "--worker=all"), SETTINGS, "logs shows one worker"),
        (("logs", "--fetch=d", "--lines=3"), SETTINGS, "drop --lines"),
        (("ssh", "--worker=all"), SETTINGS, "an interactive shell needs one worker"),
        (("stop", "--signal=HUP"), SETTINGS, "--signal=HUP: use TERM"),
        (("stop", "--", "x"), SETTINGS, "'stop' takes no arguments after --"),
        (("delete", "--nope"), SETTINGS, "unknown flag --nope"),
        (("deploy",), SETTINGS, "unknown command 'deploy'"),
        ((), SETTINGS, "no command given"),
        (("status", "--zone"), SETTINGS, "--zone needs a value"),
        (
            ("create", "--accelerator_type=v4-8"),
            {**SETTINGS, "SPOT": "maybe"},
            "SPOT=maybe: use 1 or 0",
        ),
    ],
)
def test_bad_settings_fail_clearly_before_any_gcloud_call(gcloud, args, settings, message):
    run, calls = gcloud
    result = run(*args, **settings)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.startswith("launch/tpu_vm.sh: error: ")
    assert calls() == []


# --- helpers ---------------------------------------------------------------------------------


def setup_command(tmp_path) -> str:
    """The worker command of ``setup --repo_url=...`` (a fake clone: fast, no archive)."""
    log = tmp_path / "setup_calls.jsonl"
    bin_dir = tmp_path / "setup_bin"
    if not log.exists():
        write_recorder(bin_dir, "gcloud", log)
        subprocess.run(
            ["bash", str(SCRIPT), "setup", "--repo_url=https://example.com/pdm_jax.git"],
            env=clean_env(bin_dir, **SETTINGS),
            check=True,
            capture_output=True,
        )
    return command_of(read_calls(log)[0]["argv"])


def command_lines(stdout: str) -> list[str]:
    """The printed commands: a line ends a command unless it is inside single quotes."""
    lines, current = [], ""
    for line in stdout.splitlines(keepends=True):
        current += line
        try:
            shlex.split(current)
        except ValueError:  # an open quote: the command goes on
            continue
        lines.append(current.rstrip("\n"))
        current = ""
    assert current == "", current
    return lines


def wait_for_text(path, text: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} did not get {text!r} within {timeout} s")


def wait_for_exit(pid: int, timeout: float = 20.0) -> None:
    """Waits until ``pid`` is gone or a zombie (nobody here is its parent to reap it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still runs after {timeout} s")


def kill_group(pid: int) -> None:
    """Ends the fake run's process group if a failed test left it running."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
