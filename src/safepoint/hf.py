"""``safepoint.hf``: the Hugging Face Trainer integration (install ``safepoint[hf]``)."""

from .integrations.hf import SafepointCallback, check_fits, commit_checkpoint_dir, latest_checkpoint

__all__ = ["SafepointCallback", "check_fits", "commit_checkpoint_dir", "latest_checkpoint"]
