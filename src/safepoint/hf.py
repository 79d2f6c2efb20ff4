"""``safepoint.hf``: the Hugging Face Trainer integration (install ``safepoint[hf]``)."""

from .integrations.hf import SafepointCallback, commit_checkpoint_dir, latest_checkpoint

__all__ = ["SafepointCallback", "commit_checkpoint_dir", "latest_checkpoint"]
