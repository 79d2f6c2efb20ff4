"""Distributed checkpoints with real torchrun jobs on the CPU (gloo), FSDP2 and DDP.

* one rank SIGKILLed inside a save (after writing its shards, before the vote): the whole job dies,
  nothing is committed, the restarted job resumes from the previous checkpoint and ends with
  weights bitwise equal to an uninterrupted run's;
* resharding: saved by 4 ranks, resumed by 2 (then 2 -> 1 plain process, and 2 -> 4): model and
  optimizer equal the checkpoint's tensors exactly, and the samples trained on across all the
  jobs are exactly a prefix of the global order (none repeated, none skipped);
* SIGTERM to one rank of a DDP job with async saves: every rank saves the same step and exits 0,
  and resuming it is exact;
* in-job scenarios (this file run under torchrun): the lock and the records are rank 0's, a disk
  short on one rank or a failed write on one rank means no commit and an error on every rank,
  async content, retention, a signal on one rank, a corrupt shard skipped by every rank, a
  single-process checkpoint refused with a clear error.

Each torchrun start costs seconds on a small machine, so jobs run two at a time where they can.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train_dist.py"

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env["PYTHONWARNINGS"] = "ignore::UserWarning:torch.distributed.fsdp._fully_shard._fsdp_state"
    env.pop("SAFEPOINT_FAULT", None)
    return env


class Job:
    """A ``torchrun`` job (or a plain process with ``nproc=0``), its output in a file."""

    def __init__(self, log: Path, nproc: int, *args: str, script: Path = TRAIN) -> None:
        self.log = log
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                    f"--nproc_per_node={nproc}"] if nproc else [sys.executable]
        self.cmd = [*launcher, str(script), *args]
        self._out = open(log, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._out, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT,
                                     start_new_session=True)

    def text(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = 240) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"{' '.join(self.cmd)} did not exit within {timeout}s\n{self.text()[-4000:]}")
        self._out.close()
        return rc

    def ok(self, timeout: float = 240) -> str:
        rc = self.wait(timeout)
        assert rc == 0, f"{' '.join(self.cmd)} exited {rc}\n{self.text()[-6000:]}"
        return self.text()

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._out.close()


@pytest.fixture
def jobs():
    started: list[Job] = []

    def start(log: Path, nproc: int, *args: str, **kw) -> Job:
        job = Job(log, nproc, *args, **kw)
        started.append(job)
        return job

    try:
        yield start
    finally:
        for job in started:
            job.cleanup()


def steps_in(run_dir: Path) -> list[int]:
    from safepoint import list_checkpoints

    return [c.step for c in list_checkpoints(run_dir)]


def tmp_dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if ".tmp-" in p.name)


def manifest(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "manifest.json").read_text())


def test_fsdp2_rank_killed_mid_save_then_exact_resume(tmp_path, jobs, same_weights):
    from safepoint import verify

    common = ("--mode", "fsdp", "--steps", "30")
    ref = jobs(tmp_path / "ref.log", 2, "--dir", str(tmp_path / "ref"), *common, "--every", "1000",
               "--out", str(tmp_path / "ref.safetensors"))
    run = tmp_path / "run"
    crash = jobs(tmp_path / "crash.log", 2, "--dir", str(run), *common, "--every", "10",
                 "--fault", "after_data:kill", "--fault-rank", "1", "--fault-step", "20")
    rc = crash.wait()
    assert rc != 0 and "Signal 9 (SIGKILL)" in crash.text(), crash.text()[-4000:]
    # Rank 1 wrote its shards and died before the vote: rank 0 committed nothing.
    assert steps_in(run) == [10] and tmp_dirs(run), os.listdir(run)
    verify(run / "step_00000010")
    assert "RankFailure" in crash.text()  # rank 0 noticed at the vote instead of hanging

    out = jobs(tmp_path / "resume.log", 2, "--dir", str(run), *common, "--every", "10",
               "--out", str(tmp_path / "run.safetensors")).ok()
    assert "start step 10 world 2" in out
    assert steps_in(run) == [10, 20, 30] and not tmp_dirs(run)
    m = manifest(run / "step_00000030")
    writers = m["extra"]["sharded"]["writers"]
    assert m["world_size"] == 2 and set(writers.values()) == {0, 1}
    assert writers["dcp/.metadata"] == 0 and writers["rank1/state.json"] == 1
    assert set(writers) == set(m["files"])
    ref.ok()
    same_weights(tmp_path / "run.safetensors", tmp_path / "ref.safetensors")


def _global_order(samples: int, seed: int) -> list[int]:
    from safepoint import ResumableSampler

    return ResumableSampler(samples, shuffle=True, seed=seed).epoch_order(0)


def _consumed(prefix: Path) -> list[int]:
    out: list[int] = []
    for file in sorted(prefix.parent.glob(prefix.name + ".rank*")):
        out += [int(i) for line in file.read_text().split("\n") if line for i in line.split()]
    return out


def _assert_restored(dump: Path, checkpoint: Path) -> None:
    """The model and optimizer a job restored equal the checkpoint's consolidated tensors, exactly."""
    from safetensors.torch import load_file

    from safepoint.distributed import load_consolidated

    got = load_file(str(dump))
    want = {f"model.{k}": v for k, v in load_consolidated(checkpoint, "model").items()}
    want.update({f"optimizer.{k}": v for k, v in load_consolidated(checkpoint, "optimizer").items()})
    assert sorted(got) == sorted(want)
    differ = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not differ, f"restored tensors differ from {checkpoint}: {differ[:5]}"


def test_reshard_4_to_2_to_1_and_2_to_4(tmp_path, jobs):
    from safepoint import verify
    from safepoint.distributed import export_consolidated, load_consolidated

    batch, samples = 4, 256
    args = ("--mode", "fsdp", "--batch-size", str(batch), "--samples", str(samples))
    four = tmp_path / "four"
    jobs(tmp_path / "four.log", 4, "--dir", str(four), *args, "--steps", "6", "--every", "6",
         "--log-samples", str(tmp_path / "a")).ok()
    assert manifest(four / "step_00000006")["world_size"] == 4

    two = tmp_path / "two"
    shutil.copytree(four, two)
    out = jobs(tmp_path / "two.log", 2, "--dir", str(two), *args, "--steps", "12", "--every", "12",
               "--dump-restored", str(tmp_path / "restored2.safetensors"), "--log-samples", str(tmp_path / "b")).ok()
    assert "start step 6 world 2" in out and "RNG streams cannot map 1:1" in out
    _assert_restored(tmp_path / "restored2.safetensors", four / "step_00000006")
    assert manifest(two / "step_00000012")["world_size"] == 2

    one, back = tmp_path / "one", tmp_path / "back"
    shutil.copytree(two, one)
    shutil.copytree(two, back)
    plain = jobs(tmp_path / "one.log", 0, "--dir", str(one), *args, "--steps", "14", "--every", "14",
                 "--dump-restored", str(tmp_path / "restored1.safetensors"), "--log-samples", str(tmp_path / "c"))
    up = jobs(tmp_path / "back.log", 4, "--dir", str(back), *args, "--steps", "14", "--every", "14",
              "--dump-restored", str(tmp_path / "restored4.safetensors"), "--log-samples", str(tmp_path / "d"))
    assert "start step 12 world 1" in plain.ok()
    assert "start step 12 world 4" in up.ok()
    _assert_restored(tmp_path / "restored1.safetensors", two / "step_00000012")
    _assert_restored(tmp_path / "restored4.safetensors", two / "step_00000012")
    assert manifest(one / "step_00000014")["world_size"] == 1  # a plain process saves the plain format
    assert manifest(back / "step_00000014")["world_size"] == 4

    # The data position is global: across the jobs, every sample of the order's prefix exactly once.
    order = _global_order(samples, 0)
    a, b = _consumed(tmp_path / "a"), _consumed(tmp_path / "b")
    assert len(a) == 6 * batch * 4 and len(b) == 6 * batch * 2
    for tail, ranks in ((_consumed(tmp_path / "c"), 1), (_consumed(tmp_path / "d"), 4)):
        assert len(tail) == 2 * batch * ranks
        seen = a + b + tail
        assert sorted(seen) == sorted(order[:len(seen)]), "a sample was repeated or skipped"

    # Export without the original world size: one weights-only safetensors file.
    for ckpt in (four / "step_00000006", two / "step_00000012", one / "step_00000014"):
        out_file = export_consolidated(ckpt, tmp_path / f"{ckpt.parent.name}.safetensors")
        from safetensors.torch import load_file

        exported, model = load_file(str(out_file)), load_consolidated(ckpt, "model")
        assert sorted(exported) == sorted(model) and all(torch.equal(exported[k], model[k]) for k in model)
    verify(back / "step_00000014")


def test_sigterm_on_one_ddp_rank_saves_all_and_resumes_exactly(tmp_path, jobs, same_weights):
    common = ("--mode", "ddp", "--steps", "80", "--every", "7")
    ref = jobs(tmp_path / "ref.log", 2, "--dir", str(tmp_path / "ref"), "--mode", "ddp", "--steps", "80",
               "--every", "1000", "--out", str(tmp_path / "ref.safetensors"))
    run, pids = tmp_path / "run", tmp_path / "pids"
    pids.mkdir()
    job = jobs(tmp_path / "run.log", 2, "--dir", str(run), *common, "--async-save", "--sleep", "0.1",
               "--pid-dir", str(pids))
    deadline = time.monotonic() + 120
    while "start step 0" not in job.text():
        assert job.proc.poll() is None and time.monotonic() < deadline, job.text()[-4000:]
        time.sleep(0.1)
    time.sleep(1.0)
    os.kill(int((pids / "rank1.pid").read_text()), signal.SIGTERM)
    out = job.ok(120)
    saved = [line for line in out.splitlines() if "preempted: saved step" in line]
    assert len(saved) == 2, out[-4000:]  # both ranks
    step = int(saved[0].split("saved step ")[1].split(",")[0])
    assert all(f"saved step {step}," in line for line in saved)
    assert step < 80 and steps_in(run)[-1] == step and manifest(run / f"step_{step:08d}")["world_size"] == 2
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert len({e["pid"] for e in events}) == 1  # only rank 0 writes the run's records
    assert [e["step"] for e in events if e["event"] == "preempted"] == [step]

    out = jobs(tmp_path / "resume.log", 2, "--dir", str(run), *common, "--out", str(tmp_path / "run.safetensors")).ok()
    assert f"start step {step} world 2" in out
    ref.ok()
    same_weights(tmp_path / "run.safetensors", tmp_path / "ref.safetensors")


def test_in_job_scenarios(tmp_path, jobs):
    from safepoint import CheckpointManager, IncompatibleState, SafepointWarning

    plain = tmp_path / "plain"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    with CheckpointManager(plain) as ckpt:
        ckpt.restore({"model": model})
        ckpt.save(1, {"model": model})
    out = jobs(tmp_path / "scenarios.log", 2, str(tmp_path), script=Path(__file__)).ok()
    assert "scenarios passed" in out, out[-4000:]

    # A per-rank entry that differed between ranks cannot be mapped to another world size...
    mixed = tmp_path / "mixed"
    opt = torch.optim.AdamW(model.parameters())
    with CheckpointManager(mixed) as ckpt:
        with pytest.raises(IncompatibleState, match=r"'mine'|mine"):
            ckpt.restore({"model": model, "optimizer": opt, "mine": {}})
        # ... but the rest reshards to one process, with a warning that RNG streams cannot map 1:1.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert ckpt.restore({"model": model, "optimizer": opt}) == 1
        assert any(issubclass(w.category, SafepointWarning) and "RNG" in str(w.message) for w in caught)
        assert "mine" in ckpt.restore_report.not_in_state


# ---------------------------------------------------------------- run under torchrun by the test above


def _scenarios(base: Path) -> None:
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from safepoint import CheckpointManager, DirectoryLocked, IncompatibleState, InsufficientDiskSpace, KeepLast
    from safepoint.disk import MinFree
    from safepoint.distributed import DistributedSaveError, load_consolidated
    from safepoint.lock import RunLock

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = {"model": model, "optimizer": opt, "extra": {"note": "same everywhere"}}

    def train() -> None:
        loss = model(torch.randn(4, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def expect(exc: type[BaseException], fn, *words: str) -> None:
        try:
            fn()
        except exc as err:
            assert all(w in str(err) for w in words), f"rank {rank}: {err}"
            return
        raise AssertionError(f"rank {rank}: {exc.__name__} not raised")

    run = base / "run"
    with CheckpointManager(run, keep=[KeepLast(2)]) as ckpt:
        assert ckpt.restore(state) == 0
        ckpt.save(0, state)
        assert not opt.state, "saving a fresh optimizer must not initialise its state"
        if rank == 1:  # rank 0 holds the lock for the whole job; rank 1 took none
            expect(DirectoryLocked, lambda: RunLock(run).acquire(), "in use")
        for step in range(1, 5):
            train()
            ckpt.save(step, state)
        assert [c.step for c in ckpt.list()] == [3, 4], ckpt.list()

        if rank == 1:  # rank 1 alone is short of space: no rank saves, every rank says why
            ckpt.min_free = MinFree(fraction=0.9999)
        expect(InsufficientDiskSpace, lambda: ckpt.save(5, state), "rank 1", "Nothing was written")
        assert [c.step for c in ckpt.list()] == [4], "the budget deletes unprotected checkpoints first"
        ckpt.min_free = MinFree()
        if rank == 1:  # rank 1 fails after writing its files: no commit, every rank raises
            os.environ["SAFEPOINT_FAULT"] = "after_data"
        expect(DistributedSaveError, lambda: ckpt.save(5, state), "rank 1", "not committed")
        os.environ.pop("SAFEPOINT_FAULT", None)
        dist.barrier()
        assert [c.step for c in ckpt.list()] == [4] and not [p for p in os.listdir(run) if ".tmp-" in p]

        before = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
        handle = ckpt.save_async(5, state)
        with torch.no_grad():  # training goes on while the background writer writes
            for p in model.parameters():
                p.add_(1.0)
        info = handle.result()
        saved = load_consolidated(info.path, "model")
        assert all(torch.equal(saved[k], before[k]) for k in before), "async save did not hold the staged values"

        if rank == 1:  # a signal on one rank: every rank saves at the next step() and stops
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.1)
        assert ckpt.step(6, state) and ckpt.should_stop
        assert [c.step for c in ckpt.list()] == [5, 6]
    dist.barrier()
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    pids = torch.tensor([os.getpid()])
    everyone = [torch.zeros(1, dtype=torch.int64) for _ in range(2)]
    dist.all_gather(everyone, pids)
    assert {e["pid"] for e in events} == {int(everyone[0])}, "only rank 0 writes events"
    assert {e["event"] for e in events} >= {"start", "save", "prune", "preempted", "close"}

    mixed = base / "mixed"  # for the pytest process: an entry that differs between ranks
    with CheckpointManager(mixed) as ckpt:
        ckpt.restore(state)
        ckpt.save(1, {**state, "mine": {"rank": rank}})
    assert json.loads((mixed / "step_00000001" / "manifest.json").read_text())["extra"]["sharded"]["replicated"] == ["extra"]

    if rank == 0:  # damage a shard of the newest checkpoint
        shard = sorted((run / "step_00000006" / "dcp").glob("*.distcp"))[-1]
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    dist.barrier()
    with CheckpointManager(run) as ckpt, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ckpt.restore(state) == 5, "every rank skips the corrupt checkpoint alike"
        assert any("skipping checkpoint" in str(w.message) for w in caught)
        restored = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
        assert all(torch.equal(restored[k], before[k]) for k in before)

    with CheckpointManager(base / "plain") as ckpt:  # saved by one process before this job
        expect(IncompatibleState, lambda: ckpt.restore(state), "single process")
    dist.barrier()
    if rank == 0:
        print("scenarios passed", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    _scenarios(Path(sys.argv[1]))
