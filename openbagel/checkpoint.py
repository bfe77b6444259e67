"""Load and save checkpoints in the official BAGEL layout.

A checkpoint directory holds `ema.safetensors` (or shards + `ema.safetensors.index.json`),
`ae.safetensors`, `llm_config.json`, `vit_config.json` and tokenizer files; ours adds `ae_config.json`
and `bagel_config.json`. The model is built on the meta device and every tensor is read from the
memory-mapped file straight into its final dtype and device, then assigned: peak memory stays near the
size of the weights. Every key and shape is checked before anything is assigned. Pickle files are
never read.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import BagelConfig, ConfigError
from .models.bagel import Bagel
from .models.vae import AutoEncoder
from .tokenizer import BagelTokenizer

EMA_FILE = "ema.safetensors"
EMA_INDEX = "ema.safetensors.index.json"
AE_FILE = "ae.safetensors"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.md"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong and what to do."""


@dataclass
class LoadedCheckpoint:
    config: BagelConfig
    model: Bagel
    vae: AutoEncoder
    tokenizer: BagelTokenizer
    path: Path


def resolve_path(path_or_repo_id: str | Path) -> Path:
    """A local directory as is; otherwise a hub id fetched with huggingface_hub into its cache."""
    path = Path(path_or_repo_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the checkpoint directory that contains it")
        return path
    text = str(path_or_repo_id)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise CheckpointError(f"{text} is neither a local directory nor a hub id like 'ByteDance-Seed/BAGEL-7B-MoT'")
    try:
        return download(text)
    except CheckpointError as exc:  # 'models/BAGEL-7B-MoT' reads as a folder and as a hub id: say both
        raise CheckpointError(f"there is no folder {text!r} here ({Path.cwd()}), and as a hub id: {exc}") from None


def download(repo_id: str, local_dir: str | Path | None = None) -> Path:
    """Snapshot a hub repository's checkpoint files (json, safetensors, tokenizer) into a folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_dir=local_dir, allow_patterns=HUB_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())  # one line: hub errors span several
        raise CheckpointError(f"cannot download {repo_id!r} from the hub: {reason}") from None


def _ema_files(directory: Path) -> list[Path]:
    if (directory / EMA_FILE).is_file():
        return [directory / EMA_FILE]
    index = directory / EMA_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index: {exc}") from None
        files = sorted({directory / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are missing: {missing}")
        return files
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")) or any(directory.glob("*.pth")):
        raise CheckpointError(f"{directory} holds pickle weights (.bin/.pt); only safetensors are loaded. "
                              "Convert them to ema.safetensors first.")
    raise CheckpointError(f"{directory} has no {EMA_FILE} (or {EMA_INDEX}); is it a BAGEL checkpoint?")


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
           "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
WINDOW_BYTES = 2**30  # one mapping per run of adjacent tensors up to this size


class MappedSafetensors:
    """A safetensors file read through copy-on-write memory maps of at most WINDOW_BYTES each.

    safetensors' own reader maps the whole file privately, and Linux's default overcommit check refuses
    one private mapping larger than RAM + swap: the 7B's single 29 GB file could not even be opened on
    a 24 GiB machine. Windows of adjacent tensors stay under that check while keeping the mappings (each
    holds a file descriptor) few; nothing is read until used, and a write copies only the pages it
    touches (the file never changes). Strict overcommit (`vm.overcommit_memory=2`) still counts them all.
    """

    def __init__(self, path: Path) -> None:
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n)) if n <= MAX_HEADER_BYTES else None
                size = os.fstat(f.fileno()).st_size
        except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: cannot read its header ({exc}); the file is truncated or not "
                                  "safetensors — download it again") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path} is not a safetensors file — download it again")
        header.pop("__metadata__", None)
        self.path, self.start = path, 8 + n
        self.entries = {key: self._check(key, entry) for key, entry in header.items()}
        spans = sorted((begin, end) for _, _, begin, end in self.entries.values())
        if any(b < a_end for (_, a_end), (b, _) in zip(spans, spans[1:])):
            raise CheckpointError(f"{path}: its header is malformed (tensors overlap) — download it again")
        end = self.start + max((e for _, e in spans), default=0)
        if end > size:
            raise CheckpointError(f"{path} is truncated ({size} of {end} bytes) — download it again")
        # Held only by the tensors made from them: a window whose tensors were all converted (to another
        # dtype or device) is unmapped at once, so a converting load never holds more than it needs.
        self._windows: weakref.WeakValueDictionary[int, mmap.mmap] = weakref.WeakValueDictionary()
        self._window_of = self._plan_windows(spans)

    def _check(self, key: str, entry: object) -> tuple[torch.dtype, torch.Size, int, int]:
        """(dtype, shape, begin, end) of one header entry, or a CheckpointError saying what is wrong."""
        try:
            name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]  # type: ignore[index]
            ok = (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: its header is malformed ({key}: {exc!r}) — download it again") from None
        if name not in _DTYPES:
            raise CheckpointError(f"{self.path}: unsupported tensor dtype {name!r} ({key})")
        dtype = _DTYPES[name]
        if not ok or end - begin != torch.Size(shape).numel() * dtype.itemsize:
            raise CheckpointError(f"{self.path}: its header is malformed ({key}: shape {shape}, bytes "
                                  f"{begin}..{end}) — download it again")
        return dtype, torch.Size(shape), begin, end

    @staticmethod
    def _plan_windows(spans: list[tuple[int, int]]) -> dict[int, tuple[int, int]]:
        """Each tensor's window (first byte, last byte) by its begin offset: runs of adjacent tensors."""
        runs: list[list[tuple[int, int]]] = []
        for span in spans:
            if runs and span[1] - runs[-1][0][0] <= WINDOW_BYTES:
                runs[-1].append(span)
            else:
                runs.append([span])
        return {begin: (run[0][0], run[-1][1]) for run in runs for begin, _ in run}

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> torch.Size:
        return self.entries[key][1]

    def tensor(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[key]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        first, last = self._window_of[begin]
        aligned = self.start + first - (self.start + first) % mmap.ALLOCATIONGRANULARITY
        window = self._windows.get(first)
        if window is None:
            with open(self.path, "rb") as f:
                window = mmap.mmap(f.fileno(), self.start + last - aligned, access=mmap.ACCESS_COPY, offset=aligned)
            self._windows[first] = window
        return torch.frombuffer(window, dtype=dtype, count=shape.numel(),
                                offset=self.start + begin - aligned).view(shape)


def _file_mapped(start: int, end: int) -> bool:
    """Whether [start, end) lies inside one file mapping of this process (Linux /proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(a, 16) for a in fields[0].split("-"))
            if lo <= start and end <= hi:
                return len(fields) >= 6 and fields[4] != "0" and fields[5].startswith("/")
    return False


def release_file_pages(t: torch.Tensor) -> bool:
    """Drop the resident pages of a tensor that is a view of a file mapping; returns whether it did.

    The pages stay in the file, and a later read would fault them back in unchanged (the weights are
    never written), so this only stops a weight that was copied elsewhere from counting twice in RSS.
    Anonymous memory is never touched: there, MADV_DONTNEED would zero it.
    """
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or not t.is_contiguous():
        return False
    page = mmap.PAGESIZE
    start, size = t.data_ptr(), t.numel() * t.element_size()  # this tensor's bytes, not its whole storage
    lo, hi = -(-start // page) * page, (start + size) // page * page
    if hi <= lo or not _file_mapped(start, start + size):
        return False
    return _madvise()(lo, hi - lo, 4) == 0  # MADV_DONTNEED


@cache
def _madvise() -> Callable[[int, int, int], int]:
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return madvise


def read_tensors(files: list[Path], expected: dict[str, torch.Size], dtype: torch.dtype | None,
                 device: torch.device | str, what: str) -> dict[str, torch.Tensor]:
    """Read safetensors files after checking every key and shape against `expected`."""
    found = {key: h for h in map(MappedSafetensors, files) for key in h.keys()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(f"{k}: file {tuple(found[k].shape(k))} vs model {tuple(expected[k])}"
                   for k in set(expected) & set(found) if found[k].shape(k) != expected[k])
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointError(f"{what} does not match the config: " + "; ".join(parts))
    out = {}
    for key in expected:
        try:
            t = found[key].tensor(key)
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{what}: tensor {key} cannot be read ({exc}); download the file again") from None
        out[key] = t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype)
    return out


def _expected_shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def load_checkpoint(path_or_repo_id: str | Path, *, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = torch.float32,
                    vae_dtype: torch.dtype | None = torch.float32) -> LoadedCheckpoint:
    """Build on meta, check, then assign the checkpoint's tensors in `dtype` on `device`.

    `dtype=None` keeps each tensor as the file stores it: on CPU the tensors then stay memory-mapped,
    nothing is copied, and a later pass can convert them a layer at a time (inference.quantize).
    """
    directory = resolve_path(path_or_repo_id)
    try:
        cfg = BagelConfig.load(directory)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    ema_files = _ema_files(directory)
    if not (directory / AE_FILE).is_file():
        raise CheckpointError(f"{directory} has no {AE_FILE} (the VAE weights)")
    with torch.device("meta"):
        model, vae = Bagel(cfg), AutoEncoder(cfg.vae)
    state = read_tensors(ema_files, _expected_shapes(model), dtype, device, str(directory / EMA_FILE))
    model.load_state_dict(state, strict=True, assign=True)
    del state
    vae_state = read_tensors([directory / AE_FILE], _expected_shapes(vae), vae_dtype, device, str(directory / AE_FILE))
    vae.load_state_dict(vae_state, strict=True, assign=True)
    for p in model.latent_pos_embed.parameters():
        p.requires_grad_(False)
    for p in model.vit_pos_embed.parameters():
        p.requires_grad_(False)
    tokenizer = BagelTokenizer.from_dir(directory)
    if len(tokenizer) > cfg.llm.vocab_size:
        raise CheckpointError(f"tokenizer has {len(tokenizer)} tokens but the model only {cfg.llm.vocab_size}")
    return LoadedCheckpoint(cfg, model.eval(), vae.eval(), tokenizer, directory)


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None) -> None:
    out = {k: (v.detach().to("cpu", dtype if (dtype and v.is_floating_point()) else v.dtype)).contiguous()
           for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(out, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def save_checkpoint(directory: str | Path, config: BagelConfig, model: Bagel, vae: AutoEncoder,
                    tokenizer: BagelTokenizer, dtype: torch.dtype | None = None) -> Path:
    """Write the official layout (loadable here and by the official code)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save(directory)
    tokenizer.save(directory)
    _save_atomic(model.state_dict(), directory / EMA_FILE, dtype)
    _save_atomic(vae.state_dict(), directory / AE_FILE, None)
    return directory


def random_checkpoint(directory: str | Path, config: BagelConfig, tokenizer: BagelTokenizer, seed: int = 0,
                      std: float = 0.02) -> Path:
    """A randomly initialised model saved as a checkpoint (for tests and the first demo)."""
    torch.manual_seed(seed)  # the VAE keeps torch's default init
    gen = torch.Generator().manual_seed(seed)
    model, vae = Bagel(config), AutoEncoder(config.vae)
    init_random(model, std, gen)
    return save_checkpoint(directory, config, model, vae, tokenizer)


def init_random(model: Bagel, std: float = 0.02, generator: torch.Generator | None = None) -> None:
    """Random weights for tests and benchmarks: the training init, plus a non-zero velocity head."""
    model.init_weights(std=std, generator=generator)
    with torch.no_grad():
        model.llm2vae.weight.normal_(0.0, std, generator=generator)  # non-zero so velocities are not all zero
