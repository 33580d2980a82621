"""transformers' Trainer: checkpoints of an ``apply_lora`` model that reload.

``model.save_pretrained`` / the Trainer's own checkpoints store the model's
state dict; reloading them with ``AutoModel.from_pretrained`` builds plain
layers and drops the adapter keys. :class:`AdapterCheckpointCallback` writes
the adapters beside each checkpoint in PEFT's format (``save_adapter``:
atomic, ``modules_to_save`` included), which reloads onto the base model with
:func:`fastlora.load_adapter` or ``peft.PeftModel.from_pretrained``::

    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[fastlora.integrations.AdapterCheckpointCallback()])
    trainer.train()
    # later: fastlora.load_adapter(base_model, "out/checkpoint-500/adapter")

Importing this module imports transformers (``import fastlora`` does not).
"""

from __future__ import annotations

import os

from .peft_io import save_adapter


try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - only without transformers
    raise ImportError("fastlora.integrations needs transformers (pip install transformers)") from exc


class AdapterCheckpointCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that saves the model's adapters (PEFT's
    format) into ``<output_dir>/checkpoint-<step>/<subfolder>`` at every Trainer
    save, on the main process only."""

    def __init__(self, subfolder: str = "adapter", **save_kwargs) -> None:
        """``subfolder``: where the adapter goes inside each ``checkpoint-<step>``
        folder; ``save_kwargs``: passed to :func:`fastlora.save_adapter`
        (``modules_to_save``, ``base_model_name_or_path``, ``task_type``)."""
        if not isinstance(subfolder, str) or not subfolder or os.path.isabs(subfolder) or ".." in subfolder.split(os.sep):
            raise ValueError(f"subfolder must be a relative folder name inside the checkpoint, got {subfolder!r}")
        self.subfolder = subfolder
        self.save_kwargs = save_kwargs

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RuntimeError("AdapterCheckpointCallback.on_save: the Trainer passed no model")
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", self.subfolder)
            save_adapter(getattr(model, "module", model), folder, **self.save_kwargs)
        return control


__all__ = ["AdapterCheckpointCallback"]
