"""Attention of one denoising step: a dense padding mask vs mask-free key suffixes, per SDPA backend.

The denoising block (an image's latent tokens) attends to its own keys plus its guidance branch's
context. Branches have contexts of different lengths: the engine used to pad them under a dense bool
mask; it now right-aligns them and runs each branch's rows unmasked on its key suffix
(`openbagel.models.layers.KeySuffixes`). This times one attention call of both ways for the 7B shapes
(28 query heads, 4 K/V heads, head dim 128, a 1024x1024 image = 4098 block tokens), for every SDPA
backend that accepts the inputs, with K/V expanded to the query heads or passed grouped (`enable_gqa`).

Usage:
    python benchmarks/attention_kernels.py                       # CUDA, bf16, the 7B t2i shapes
    python benchmarks/attention_kernels.py --device cpu --dtype fp32 --block 256 --heads 4 --kv-heads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, report  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BACKENDS = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def seconds_per_call(fn, device: torch.device, repeat: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--block", type=int, default=4098, help="block tokens (1024² image: 64*64 + 2)")
    parser.add_argument("--contexts", default="40,12", help="context lengths of the guidance branches")
    parser.add_argument("--heads", type=int, default=28)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/attention_kernels.json")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    contexts = [int(c) for c in args.contexts.split(",")]
    B, L, Hq, Hkv, D = len(contexts), args.block, args.heads, args.kv_heads, args.head_dim
    C = max(contexts)
    g = torch.Generator(device).manual_seed(0)
    q = torch.randn(B, Hq, L, D, device=device, dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, C + L, D, device=device, dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, C + L, D, device=device, dtype=dtype, generator=g)
    starts = [C - c for c in contexts]  # right-aligned contexts, as KVCache.stack lays them out
    mask = (torch.arange(C + L, device=device)[None] >= torch.tensor(starts, device=device)[:, None])
    mask = mask[:, None, None].expand(B, 1, L, C + L)
    expand = lambda t: t.repeat_interleave(Hq // Hkv, dim=1)  # noqa: E731
    flop = sum(4 * Hq * L * (c + L) * D for c in contexts)

    def masked(grouped: bool):
        return lambda: F.scaled_dot_product_attention(q, k if grouped else expand(k), v if grouped else expand(v),
                                                      attn_mask=mask, enable_gqa=grouped)

    def suffixes(grouped: bool):
        def run():
            return torch.cat([F.scaled_dot_product_attention(
                q[b:b + 1], k[b:b + 1, :, s:] if grouped else expand(k[b:b + 1, :, s:]),
                v[b:b + 1, :, s:] if grouped else expand(v[b:b + 1, :, s:]), enable_gqa=grouped)
                for b, s in enumerate(starts)])
        return run

    reference = masked(False)().float()
    rows = []
    for layout, make in [("dense mask", masked), ("key suffixes", suffixes)]:
        for grouped in (False, True):
            for name, backend in BACKENDS.items():
                if device.type == "cpu" and name not in ("default", "math"):
                    continue
                fn = make(grouped)
                try:
                    with sdpa_kernel(backend) if backend is not None else torch.no_grad():
                        out = fn()
                        seconds = seconds_per_call(fn, device, args.repeat)
                except RuntimeError as error:  # the backend rejects these inputs
                    rows.append({"layout": layout, "kv": "grouped" if grouped else "expanded", "backend": name,
                                 "ms": None, "note": str(error).splitlines()[0][:80]})
                    continue
                err = float((out.float() - reference).abs().max())
                rows.append({"layout": layout, "kv": "grouped" if grouped else "expanded", "backend": name,
                             "ms": round(seconds * 1e3, 3), "tflops": round(flop / seconds / 1e12, 1),
                             "max_abs_diff": round(err, 4)})
                print(rows[-1], flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report(rows, ["layout", "kv", "backend", "ms", "tflops", "max_abs_diff", "note"], args.out,
           {"benchmark": "attention_kernels", "device": device_name, "dtype": args.dtype, "block": L,
            "contexts": contexts, "heads": Hq, "kv_heads": Hkv, "head_dim": D, **environment(torch.get_num_threads())})


if __name__ == "__main__":
    with torch.no_grad():
        main()
