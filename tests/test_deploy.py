"""The deployment recipes in examples/deploy/ say what they must, checked with parsers.

No Docker engine, Kubernetes or SLURM runs here: the YAML is parsed (PyYAML) and its key fields
checked against each other — the run directory on a named volume / PVC, the entry point through
``safepoint run``, a platform grace period longer than the supervisor's ``--grace`` — and the
batch script is syntax-checked by bash. The behaviour those entry points rely on (kill the
command, start it again on the same directory; SIGTERM saves and exits 0) is tested with real
processes in test_supervisor.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed: pip install pyyaml")

from safepoint.supervisor import parse_seconds  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[1] / "examples" / "deploy"


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def supervisor_part(argv: list[str]) -> list[str]:
    assert argv[:2] == ["safepoint", "run"], argv
    return argv[:argv.index("--")]


def dockerfile_json(instruction: str) -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    m = re.search(rf"^{instruction} (\[.*\])$", text, re.M)
    assert m, f"no exec-form {instruction} in the Dockerfile"
    return json.loads(m.group(1))


def test_dockerfile_enters_through_the_supervisor_on_the_volume() -> None:
    entry = dockerfile_json("ENTRYPOINT")
    sup = supervisor_part(entry)
    run_dir = option(sup, "--dir")
    assert entry[-1] == "--"
    assert run_dir.startswith("/runs/")
    text = (DEPLOY / "Dockerfile").read_text()
    assert "VOLUME /runs" in text and '"torch==2.13.0"' in text
    cmd = dockerfile_json("CMD")
    assert option(cmd, "--dir") == run_dir  # the trainer checkpoints where the supervisor looks


def test_compose_keeps_the_run_on_a_named_volume() -> None:
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    train = doc["services"]["train"]
    assert "runs" in doc["volumes"]  # named: it survives `docker compose down` (not `down -v`)
    assert "runs:/runs" in train["volumes"]
    assert train["init"] is True and train["stop_signal"] == "SIGTERM"
    entry = dockerfile_json("ENTRYPOINT")
    grace = parse_seconds(option(supervisor_part(entry), "--grace"))
    assert parse_seconds(train["stop_grace_period"]) > grace
    assert option(train["command"], "--dir") == option(entry, "--dir")
    assert train["restart"] == "no"  # the supervisor restarts; a crash loop must stay stopped
    dash = doc["services"]["dashboard"]
    assert dash["entrypoint"][:2] == ["safepoint", "serve"]
    assert option(dash["entrypoint"], "--host") == "0.0.0.0" and "SAFEPOINT_TOKEN" in dash["environment"]
    assert all(p.startswith("127.0.0.1:") for p in dash["ports"])


def test_kubernetes_job_mounts_the_claim_and_outlasts_the_grace_period() -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "job.yaml").read_text())}
    pvc, job = docs["PersistentVolumeClaim"], docs["Job"]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    sup = supervisor_part(container["command"])
    assert container["command"][-1] == "--"
    grace = parse_seconds(option(sup, "--grace"))
    assert pod["terminationGracePeriodSeconds"] >= grace + 10
    assert pod["restartPolicy"] == "Never"
    (volume,) = pod["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    (mount,) = container["volumeMounts"]
    assert mount["name"] == volume["name"]
    run_dir = option(sup, "--dir")
    assert run_dir.startswith(mount["mountPath"] + "/") and option(container["args"], "--dir") == run_dir
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"type": "DisruptionTarget"} in rules[0]["onPodConditions"] and rules[0]["action"] == "Ignore"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_slurm_script_signals_ahead_and_requeues() -> None:
    text = (DEPLOY / "train.sbatch").read_text()
    directives = re.findall(r"^#SBATCH (\S+)", text, re.M)
    assert "--signal=USR1@120" in directives and "--requeue" in directives
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    m = re.search(r"safepoint run .*--grace (\S+)", text)
    assert m and parse_seconds(m.group(1)) < 120  # the trainer must be done before the time limit
    bash = shutil.which("bash")
    if bash:
        subprocess.run([bash, "-n", str(DEPLOY / "train.sbatch")], check=True)
