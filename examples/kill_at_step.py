"""Run a training script, SIGKILLing it right after step ``KILL_AT`` on its first start only.

For demonstrations and measurements of what a hard kill between disk saves costs (the memory
tier's tests and benchmark): ``KILL_TRAIN`` names the script, ``KILL_STARTS`` a file that counts
starts (so the restarted process trains on), and the script's own arguments follow.
"""

import os
import runpy
import signal
import sys

from safepoint import CheckpointManager

starts = os.environ["KILL_STARTS"]
with open(starts, "a") as f:
    f.write("x")
if os.path.getsize(starts) == 1:
    step = CheckpointManager.step

    def killing_step(self, n, state, **kw):
        saved = step(self, n, state, **kw)
        if n == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return saved

    CheckpointManager.step = killing_step
sys.argv = [os.environ["KILL_TRAIN"]] + sys.argv[1:]
runpy.run_path(os.environ["KILL_TRAIN"], run_name="__main__")
