"""launch/slurm_gpu.sh against fake ``sbatch`` (records argv and the job script) and ``srun``.

The recorded job script is run with bash as a node would run it, with a fake ``srun`` that
runs its command and a venv whose ``python`` records its argv, so the tests compare the
program's argv exactly. No JAX here.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch.fakes import REPO, TRICKY_ARGS, clean_env, read_calls, write_recorder

SCRIPT = REPO / "launch" / "slurm_gpu.sh"

_SRUN = """#!/bin/sh
# Fake srun: records its own options, then runs the command (one task, here).
while [ $# -gt 0 ]; do
  case $1 in --*) echo "$1" >> "$FAKE_LOG_DIR/srun_options"; shift ;; *) break ;; esac
done
exec "$@"
"""

_PYTHON = """#!{python}
import json, os, sys
with open(os.path.join(os.environ["FAKE_LOG_DIR"], "python_calls.jsonl"), "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(),
                        "venv": os.environ.get("VIRTUAL_ENV"),
                        "test_env": os.environ.get("PDM_TEST_FLAGS")}}) + "\\n")
"""


@pytest.fixture
def slurm(tmp_path):
    """(submit, sbatch_calls, venv): the script with a recording sbatch first on PATH."""
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch_calls.jsonl"
    write_recorder(bin_dir, "sbatch", log, read_stdin=True, job_id="4242")
    venv = tmp_path / "venv"
    tools = venv / "tools"
    tools.mkdir(parents=True)
    (venv / "bin").mkdir()
    (venv / "bin" / "activate").write_text(
        f"export VIRTUAL_ENV='{venv}'\nPATH='{tools}':\"$PATH\"\n"
    )
    (tools / "python").write_text(_PYTHON.format(python=sys.executable))
    (tools / "python").chmod(0o755)

    def submit(*args: str, **settings: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(SCRIPT), *args],
            cwd=REPO,
            env=clean_env(bin_dir, **settings),
            capture_output=True,
            text=True,
            timeout=60,
        )

    return submit, lambda: read_calls(log), venv


def run_job(script: str, tmp_path: Path) -> tuple[list[dict], list[str]]:
    """Runs a job script as a node would (fake srun); returns python's calls and srun's options."""
    node = tmp_path / "node"
    node.mkdir(parents=True)
    (node / "srun").write_text(_SRUN)
    (node / "srun").chmod(0o755)
    env = {"PATH": f"{node}:/usr/bin:/bin", "FAKE_LOG_DIR": str(node), "HOME": str(node)}
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    calls = [json.loads(line) for line in (node / "python_calls.jsonl").read_text().splitlines()]
    return calls, (node / "srun_options").read_text().split()


def test_submits_one_task_per_node_with_the_settings(slurm, tmp_path):
    submit, calls, venv = slurm
    logs = tmp_path / "slurm logs"
    result = submit(
        "--nodes=4",
        "--gpus_per_node=8",
        "--cpus_per_task=16",
        "--partition=gpu",
        "--account=my-acct",
        "--time=1-00:00:00",
        "--job_name=pdm-2s",
        f"--log_dir={logs}",
        f"--venv={venv}",
        "--env=PDM_TEST_FLAGS=--a=1 --b='2'",
        "--",
        *TRICKY_ARGS,
    )
    assert result.returncode == 0, result.stderr
    assert "Submitted job 4242" in result.stdout and f"{logs}/pdm-2s-4242.log" in result.stdout
    assert logs.is_dir()
    (call,) = calls()
    assert call["argv"] == [
        "--parsable",
        "--job-name=pdm-2s",
        "--nodes=4",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        f"--output={logs}/%x-%j.log",
        "--cpus-per-task=16",
        "--partition=gpu",
        "--account=my-acct",
        "--time=1-00:00:00",
        "--signal=TERM@300",
    ]
    pythons, srun_options = run_job(call["stdin"], tmp_path)
    assert srun_options == ["--kill-on-bad-exit=1"]
    assert pythons == [
        {
            "argv": ["-u", "-m", "pdm_jax.main", "--distributed", *TRICKY_ARGS],
            "cwd": str(REPO),
            "venv": str(venv),
            "test_env": "--a=1 --b='2'",
        }
    ]


def test_settings_from_the_environment_and_other_modules(slurm, tmp_path):
    submit, calls, venv = slurm
    args = ["--config=configs/pdm.py:two_stream", "--what=train_step", "--batch_size=64"]
    env = {"NODES": "2", "GPUS_PER_NODE": "4", "VENV": str(venv), "LOG_DIR": str(tmp_path)}
    assert submit("--nodes=1", "--module=pdm_jax.benchmark", "--", *args, **env).returncode == 0
    env["TERM_BEFORE_END"] = "0"
    assert submit("--", "--config=c.py", "--nodistributed", **env).returncode == 0
    bench, plain = calls()
    assert bench["argv"][2:6] == [
        "--nodes=1",  # the flag wins over NODES
        "--ntasks-per-node=1",
        "--gpus-per-node=4",
        f"--output={tmp_path}/%x-%j.log",
    ]
    assert not any(a.startswith("--signal") for a in plain["argv"])
    assert run_job(bench["stdin"], tmp_path / "a")[0][0]["argv"] == [
        "-u",
        "-m",
        "pdm_jax.benchmark",
        *args,
    ]
    assert run_job(plain["stdin"], tmp_path / "b")[0][0]["argv"] == [
        "-u",
        "-m",
        "pdm_jax.main",
        "--config=c.py",
        "--nodistributed",
    ]


def test_dry_run_prints_exactly_what_is_submitted(slurm, tmp_path):
    submit, calls, venv = slurm
    args = ["--nodes=2", "--gpus_per_node=8", f"--venv={venv}", f"--log_dir={tmp_path / 'l'}"]
    printed = submit(*args, "--dry_run", "--", *TRICKY_ARGS)
    assert printed.returncode == 0, printed.stderr
    assert calls() == [] and not (tmp_path / "l").exists()
    submitted = submit(*args, "--", *TRICKY_ARGS)
    assert submitted.returncode == 0, submitted.stderr
    # The printed text, run by a shell, makes the same sbatch call with the same job script.
    bin_dir = tmp_path / "bin2"
    write_recorder(bin_dir, "sbatch", tmp_path / "replayed.jsonl", read_stdin=True)
    replay = subprocess.run(
        ["bash", "-c", printed.stdout], env=clean_env(bin_dir), capture_output=True
    )
    assert replay.returncode == 0, replay.stderr
    assert read_calls(tmp_path / "replayed.jsonl") == calls()


def test_help_lists_every_flag_and_variable(slurm):
    submit, calls, _ = slurm
    text = submit("--help").stdout
    script = SCRIPT.read_text()
    for name in re.findall(r"^    ([a-z_]+)\) [A-Z_]+=\$value", script, re.M):
        assert f"--{name}=" in text, name
    for variable in re.findall(r"^([A-Z_]+)=.*\$\{\1:-", script, re.M):
        assert f"[{variable}" in text, variable
    assert "--dry_run" in text and calls() == []


@pytest.mark.parametrize(
    "args, settings, message",
    [
        (("--", "x"), {"GPUS_PER_NODE": "8"}, "no node count: pass --nodes=N or set NODES"),
        (("--nodes=2", "--", "x"), {}, "no GPU count: pass --gpus_per_node=G (e.g. 8)"),
        (("--nodes=0", "--gpus_per_node=8", "--", "x"), {}, "--nodes=0: give a whole number"),
        (
            ("--nodes=2", "--gpus_per_node=8"),
            {},
            "nothing to run: give the program's flags after --",
        ),
        (
            ("--nodes=2", "--gpus_per_node=8", "--venv=/nowhere", "--", "x"),
            {},
            "no venv at /nowhere",
        ),
        (("--nodes=2", "--gpus_per_node=8", "--gpus=8", "--", "x"), {}, "unknown flag --gpus"),
        (("--nodes=2", "--gpus_per_node=8", "--module=a-b", "--", "x"), {}, "not a Python module"),
        (
            ("--nodes=2", "--gpus_per_node=8", "--env=A", "--", "x"),
            {},
            "--env=A: use --env=KEY=VALUE",
        ),
        (("--nodes=2", "--gpus_per_node=8", "--term_before_end=5m", "--", "x"), {}, "give seconds"),
        (
            ("--nodes=2", "--gpus_per_node=8", "--job_name=a b", "--", "x"),
            {},
            "--job_name=a b: use",
        ),
        (("--nodes=2", "stray"), {}, "unexpected argument 'stray'"),
        (("--nodes",), {}, "--nodes needs a value"),
    ],
)
def test_bad_settings_fail_clearly_before_sbatch(slurm, args, settings, message):
    submit, calls, venv = slurm
    result = submit(*args, **{"VENV": str(venv), **settings})
    assert result.returncode == 2
    assert result.stderr.startswith("launch/slurm_gpu.sh: error: ") and message in result.stderr
    assert calls() == []
