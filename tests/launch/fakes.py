"""Fake executables for the launch-script tests, and a fake worker to run remote commands on.

The launch scripts call ``gcloud``, ``sbatch`` and ``srun``; the tests put recorders of the
same names first on ``PATH``. A recorder appends one JSON object per call to a log file:
its ``argv`` (without the program name) and, for ``sbatch``, its ``stdin``.

What gcloud would run on a TPU worker (``--command=...``) is run here by ``bash -c`` in a
fake home directory, as ssh runs it with the worker's login shell, with fake ``hostname``,
``python3.11`` (whose venvs hold a ``python`` and ``pip`` that record their argv) and
``sudo``/``gcsfuse``/``mountpoint``/``git`` on ``PATH``.
"""

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# --config.* overrides that a shell would split, expand or end early if quoted wrongly.
TRICKY_ARGS = [
    "--config=configs/pdm.py:two_stream,map_patch_factor=2",
    "--workdir=gs://my bucket/pdm runs",
    "--config.data.dir=/mnt/gcs/coco pdm",
    '--config.sampler.prompt=a "red" bus, it\'s 2 = 1+1; $HOME `id` $(date) * ~ \\ !x',
    "--config.train.note=tab\there\nnew line",
    "--config.name=été",
    "positional with spaces",
    "",
]

_RECORDER = """#!{python}
import json, os, shutil, sys
call = {{"argv": sys.argv[1:]}}
if {read_stdin}:
    call["stdin"] = sys.stdin.read()
with open({log!r}, "a") as f:
    f.write(json.dumps(call) + "\\n")
scp_dir = os.environ.get("FAKE_SCP_DIR")
if scp_dir and sys.argv[1:4] == ["compute", "tpus", "tpu-vm"] and sys.argv[4:5] == ["scp"]:
    for source in [a for a in sys.argv[5:] if not a.startswith("-")][:-1]:
        if ":" not in source:  # an upload: keep what the workers would receive
            shutil.copy(source, scp_dir)
if {job_id!r}:
    print({job_id!r})
"""


def _write_executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def write_recorder(
    bin_dir: Path, name: str, log: Path, *, read_stdin: bool = False, job_id: str = ""
) -> Path:
    """Writes ``bin_dir/name``, which appends its argv (and stdin) to ``log`` as JSON.

    Args:
        bin_dir: Folder for the executable (put first on ``PATH``).
        name: Executable name, e.g. ``gcloud``.
        log: File the calls are appended to, one JSON object per line.
        read_stdin: Whether to record stdin too (``sbatch`` reads its job script there).
        job_id: Printed on stdout when given (``sbatch --parsable`` prints the job id).

    Returns:
        The executable's path.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    text = _RECORDER.format(
        python=sys.executable, log=str(log), read_stdin=read_stdin, job_id=job_id
    )
    return _write_executable(bin_dir / name, text)


def read_calls(log: Path) -> list[dict]:
    """The calls a recorder logged, in order; [] when it was never called."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def clean_env(bin_dir: Path, **settings: str) -> dict[str, str]:
    """This process's environment without the launch scripts' settings, ``bin_dir`` first on PATH.

    Args:
        bin_dir: Folder of the fake executables.
        **settings: Environment variables to set (e.g. ``TPU_NAME="t"``).

    Returns:
        The environment for the launch script.
    """
    names = {
        "TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "QUEUED_RESOURCE",
        "SPOT", "PREEMPTIBLE", "RESERVED", "REPO_URL", "BRANCH", "GCS_BUCKET", "MOUNT_POINT",
        "REMOTE_PYTHON", "REMOTE_DIR", "REMOTE_VENV", "RUN_NAME", "MODULE", "WORKER", "DRY_RUN",
        "NODES", "GPUS_PER_NODE", "CPUS_PER_TASK", "PARTITION", "ACCOUNT", "TIME_LIMIT",
        "JOB_NAME", "LOG_DIR", "VENV", "TERM_BEFORE_END",
    }  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key not in names}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.update(settings)
    return env


# --- a fake TPU worker -----------------------------------------------------------------

_VENV_TOOL = """#!{python}
# Fake venv {name}: records argv, cwd and the active venv; python -c prints a version.
import json, os, signal, sys, time
home = os.environ["HOME"]
host = os.environ.get("FAKE_HOSTNAME", "")
call = {{"tool": {name!r}, "argv": sys.argv[1:], "cwd": os.getcwd(), "host": host,
        "venv": os.environ.get("VIRTUAL_ENV"), "pid": os.getpid(), "pgid": os.getpgid(0),
        "env": {{k: v for k, v in os.environ.items() if k.startswith("PDM_TEST_")}},
        "constraints_here": os.path.exists("constraints.txt")}}
with open(os.path.join(home, "calls.jsonl"), "a") as f:
    f.write(json.dumps(call) + "\\n")
if sys.argv[1:2] == ["-c"]:
    print("0.10.2")
elif {name!r} == "python":
    print(f"fake python on {{host}}: step 1", flush=True)
    if os.environ.get("FAKE_PYTHON_WAIT"):
        def on_term(signum, frame):
            with open(os.path.join(home, "terminated"), "w") as f:
                f.write(str(signum))
            sys.exit(128 + signum)
        signal.signal(signal.SIGTERM, on_term)
        for _ in range(600):  # at most 60 s, so that nothing outlives a failed test
            time.sleep(0.1)
"""

_PYTHON311 = """#!{python}
# Fake interpreter for setup: only `-m venv DIR`, which makes an activate script.
import os, sys
assert sys.argv[1:3] == ["-m", "venv"], sys.argv
venv, tools = os.path.abspath(sys.argv[3]), {venv_tools!r}
os.makedirs(os.path.join(venv, "bin"), exist_ok=True)
with open(os.path.join(venv, "bin", "activate"), "w") as f:
    f.write(f"export VIRTUAL_ENV='{{venv}}'\\nPATH='{{tools}}':\\"$PATH\\"\\n")
"""

_GIT = """#!/bin/sh
# Fake git for setup: `git clone ... URL DIR` makes DIR with a constraints file.
echo "$@" >> "$HOME/git_args"
for last; do :; done
mkdir -p "$last" && touch "$last/constraints.txt"
"""

_SH_TOOLS = {
    "hostname": '#!/bin/sh\necho "$FAKE_HOSTNAME"\n',
    "sudo": '#!/bin/sh\nexec "$@"\n',
    "mountpoint": "#!/bin/sh\nexit 1\n",
    "gcsfuse": '#!/bin/sh\necho "$@" >> "$HOME/gcsfuse_args"\n',
    "git": _GIT,
}


class FakeWorker:
    """A TPU worker: its own home directory, hostname and tools; runs ``--command`` strings."""

    def __init__(self, root: Path, host: str):
        self.host = host
        self.home = root / host
        self.home.mkdir(parents=True)
        self.bin = root / "worker_bin"
        tools = root / "worker_venv_tools"
        if not self.bin.exists():
            self.bin.mkdir()
            tools.mkdir()
            for name in ("python", "pip"):
                _write_executable(tools / name, _VENV_TOOL.format(python=sys.executable, name=name))
            _write_executable(
                self.bin / "python3.11",
                _PYTHON311.format(python=sys.executable, venv_tools=str(tools)),
            )
            for name, text in _SH_TOOLS.items():
                _write_executable(self.bin / name, text)

    def env(self, **extra: str) -> dict[str, str]:
        """The worker's environment: its HOME and hostname, fake tools first on PATH."""
        env = {
            "HOME": str(self.home),
            "PATH": f"{self.bin}{os.pathsep}/usr/bin{os.pathsep}/bin",
            "FAKE_HOSTNAME": self.host,
            "LANG": "C.UTF-8",
        }
        env.update(extra)
        return env

    def ssh(self, command: str, **extra_env: str) -> subprocess.CompletedProcess:
        """Runs ``command`` the way ssh does: ``bash -c COMMAND`` in the home directory."""
        return subprocess.run(
            ["bash", "-c", command],
            cwd=self.home,
            env=self.env(**extra_env),
            capture_output=True,
            text=True,
            timeout=60,
        )

    def calls(self, tool: str | None = None) -> list[dict]:
        """What the fake python/pip recorded on this worker (optionally of one tool)."""
        calls = read_calls(self.home / "calls.jsonl")
        return [c for c in calls if tool is None or c["tool"] == tool]

    def wait_for_run(self, timeout: float = 20.0) -> dict:
        """The first record of ``python -u -m ...`` (a background run), waiting for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = [c for c in self.calls("python") if c["argv"][:1] == ["-u"]]
            if runs:
                return runs[0]
            time.sleep(0.05)
        raise AssertionError(f"{self.host}: the run did not start within {timeout} s")


def command_of(argv: list[str]) -> str:
    """The ``--command=`` value of a recorded ``gcloud ... ssh`` argv.

    This is the string the worker's login shell runs: gcloud splits it at single spaces
    into ssh's remote-command words (no tty), and ssh joins them with single spaces again.
    """
    commands = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    assert len(commands) == 1, argv
    return commands[0]
