"""A test hook for ms-swift: SIGKILL the trainer while safepoint commits ``checkpoint-N``.

    KILL_IN_SAVE=16 swift sft ... --external_plugins examples/swift/fault_plugin.py SAFEPOINT_PLUGIN \
        --callbacks kill_in_save safepoint

After the Trainer has written ``checkpoint-N`` and before safepoint writes its manifest, the process
kills itself with SIGKILL (``SAFEPOINT_FAULT=before_manifest:kill``): what a power cut or the OOM
killer does mid-save. List ``kill_in_save`` before ``safepoint`` in ``--callbacks``.
"""

import os

from swift.callbacks import TrainerCallback, callbacks_map


class KillInSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ.get("KILL_IN_SAVE", "-1")):
            os.environ["SAFEPOINT_FAULT"] = "before_manifest:kill"


callbacks_map["kill_in_save"] = KillInSave
