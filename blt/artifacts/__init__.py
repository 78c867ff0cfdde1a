"""The loading room: everything that reads what training and export wrote, below the trainer
(it never imports blt.train) and without unpickling code.

    load.py         any MODEL path (run, checkpoint of any engine and ZeRO stage, export) -> Loaded
    checkpoints.py  finding complete step dirs; state.json and config.yaml; their weights
    exports.py      export dirs (safetensors + JSON)
    zero.py         DeepSpeed ZeRO shards, consolidated with DeepSpeed's reader under weights_only
    files.py        .pt (weights_only, allow-listed) and safetensors reading; weights checked to fit

    from blt.artifacts import load_model
    loaded = load_model("runs/tiny")   # .model, .cfg, .patcher, .where, .meta
"""

from blt.artifacts.checkpoints import CheckpointError, find_checkpoint
from blt.artifacts.exports import ExportError, is_export
from blt.artifacts.load import Loaded, build_patcher, load_model

__all__ = ["CheckpointError", "ExportError", "Loaded", "build_patcher", "find_checkpoint", "is_export", "load_model"]
