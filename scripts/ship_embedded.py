"""Copy a Shapes run's exported EMA weights into the package as the embedded default model.

The LLM/ViT weights are stored in bf16 (as the official checkpoint) to stay under the 40 MB budget;
the small autoencoder stays fp32. Usage: python scripts/ship_embedded.py runs/shapes-tiny/export
"""

import sys
from pathlib import Path

import torch

from openbagel.checkpoint import load_checkpoint, save_checkpoint
from openbagel.inference.pipeline import EMBEDDED_MODEL


def main(export_dir: str, target: Path = EMBEDDED_MODEL) -> None:
    ck = load_checkpoint(export_dir)
    save_checkpoint(target, ck.config, ck.model, ck.vae, ck.tokenizer, dtype=torch.bfloat16)
    size = sum(f.stat().st_size for f in target.iterdir())
    print(f"wrote {target} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main(sys.argv[1])
