"""Configuration dataclasses for BAGEL: the LLM, the ViT, the VAE and the whole model.

Defaults are the released BAGEL-7B-MoT values. `PRESETS` holds named configurations, and the
`*_json` helpers read and write the official `llm_config.json` / `vit_config.json` files so that a
checkpoint directory is self-describing. Fields the official code sets in code (not in a file) live in
our own `bagel_config.json`; a directory without it gets the 7B preset's values.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A configuration file or value that cannot describe a BAGEL model."""


@dataclass(frozen=True)
class LLMConfig:
    """Qwen2 decoder with Mixture-of-Transformers layers (both experts share attention)."""

    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4  # GQA: 7 query heads per key/value head
    vocab_size: int = 152064
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    qk_norm: bool = True
    tie_word_embeddings: bool = False
    layer_module: str = "Qwen2MoTDecoderLayer"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be divisible by num_key_value_heads")
        if self.layer_module != "Qwen2MoTDecoderLayer":
            raise ConfigError(f"only Qwen2MoTDecoderLayer is supported, got {self.layer_module!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class ViTConfig:
    """SigLIP NaViT encoder. `num_hidden_layers` is the number of layers *used*.

    The official `vit_config.json` stores one more layer than BAGEL runs (it takes the penultimate
    layer's features), so reading subtracts one and writing adds it back.
    """

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 26
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 980
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("ViT hidden_size must be divisible by num_attention_heads")

    @property
    def max_patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class VAEConfig:
    """FLUX.1 autoencoder (the official code hard-codes these values in `load_ae`)."""

    resolution: int = 256
    in_channels: int = 3
    downsample: int = 8
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    norm_groups: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        if 2 ** (len(self.ch_mult) - 1) != self.downsample:
            raise ConfigError(f"ch_mult of {len(self.ch_mult)} levels cannot downsample by {self.downsample}")
        for mult in self.ch_mult:
            if (self.ch * mult) % self.norm_groups:
                raise ConfigError("every VAE channel count must be divisible by norm_groups")


@dataclass(frozen=True)
class ImageTransformConfig:
    """Resize rules of the official `ImageTransform` (reference section 5.7)."""

    max_size: int
    min_size: int
    stride: int
    max_pixels: int = 14 * 14 * 9 * 1024


@dataclass(frozen=True)
class BagelConfig:
    """The whole model: LLM + ViT + VAE and the glue between them."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    latent_patch_size: int = 2
    max_latent_size: int = 64  # side of the latent position table; the release needs 64
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    interpolate_pos: bool = False
    timestep_shift: float = 1.0  # training only; inference passes its own shift
    # Inference-side facts that belong to a checkpoint (not to a run).
    vae_transform: ImageTransformConfig = field(
        default_factory=lambda: ImageTransformConfig(max_size=1024, min_size=512, stride=16)
    )
    vit_transform: ImageTransformConfig = field(
        default_factory=lambda: ImageTransformConfig(max_size=980, min_size=224, stride=14)
    )
    default_image_size: tuple[int, int] = (1024, 1024)
    think_system_prompts: dict[str, str] = field(default_factory=dict)
    # Per-task overrides of the pipeline's sampler defaults, e.g. {"generate": {"num_inference_steps": 20}}.
    task_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra_special_tokens: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.interpolate_pos:
            raise ConfigError("interpolate_pos=True is not used by any released checkpoint and is not supported")
        object.__setattr__(self, "default_image_size", tuple(self.default_image_size))
        object.__setattr__(self, "extra_special_tokens", tuple(self.extra_special_tokens))
        if self.vit.max_patches_per_side > self.vit_max_num_patch_per_side:
            raise ConfigError("ViT image_size / patch_size exceeds vit_max_num_patch_per_side")

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token side: VAE stride times latent patch size (16 for BAGEL)."""
        return self.vae.downsample * self.latent_patch_size

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size**2 * self.vae.z_channels

    @property
    def max_image_side(self) -> int:
        return self.max_latent_size * self.latent_downsample

    # ----- official files -------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write llm_config.json, vit_config.json, ae_config.json and bagel_config.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _write_json(directory / "llm_config.json", llm_config_to_json(self.llm))
        _write_json(directory / "vit_config.json", vit_config_to_json(self.vit))
        _write_json(directory / "ae_config.json", asdict(self.vae))
        glue = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("llm", "vit", "vae")}
        glue["vae_transform"] = asdict(self.vae_transform)
        glue["vit_transform"] = asdict(self.vit_transform)
        _write_json(directory / "bagel_config.json", glue)

    @classmethod
    def load(cls, directory: str | Path) -> "BagelConfig":
        """Read a checkpoint directory's config files; missing optional files fall back to the 7B preset."""
        directory = Path(directory)
        base = PRESETS["bagel-7b-mot"]
        for required in ("llm_config.json", "vit_config.json"):
            if not (directory / required).is_file():
                raise ConfigError(f"{directory} is not a BAGEL checkpoint: {required} is missing")
        llm = llm_config_from_json(_read_json(directory / "llm_config.json"))
        vit = vit_config_from_json(_read_json(directory / "vit_config.json"))
        vae = base.vae
        if (directory / "ae_config.json").is_file():
            vae = _build(VAEConfig, _read_json(directory / "ae_config.json"), "ae_config.json")
        glue: dict[str, Any] = {}
        if (directory / "bagel_config.json").is_file():
            glue = _read_json(directory / "bagel_config.json")
            for key in ("vae_transform", "vit_transform"):
                if key in glue:
                    glue[key] = _build(ImageTransformConfig, glue[key], f"bagel_config.json:{key}")
        else:
            glue = {"think_system_prompts": base.think_system_prompts}
        known = {f.name for f in fields(cls)}
        unknown = set(glue) - known
        if unknown:
            raise ConfigError(f"bagel_config.json has unknown fields: {sorted(unknown)}")
        try:
            return cls(llm=llm, vit=vit, vae=vae, **glue)
        except TypeError as exc:
            raise ConfigError(f"bagel_config.json: {exc}") from None


# ----- the official json formats ------------------------------------------------------------------


def llm_config_to_json(cfg: LLMConfig) -> dict[str, Any]:
    """The Qwen2 `llm_config.json` fields, plus BAGEL's `qk_norm` and `layer_module`."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "torch_dtype": "bfloat16",
        "qk_norm": cfg.qk_norm,
        "layer_module": cfg.layer_module,
    }


def llm_config_from_json(data: dict[str, Any]) -> LLMConfig:
    # BAGEL overrides these three after loading, whatever the file says (reference 3.1).
    values = {f.name: data[f.name] for f in fields(LLMConfig) if f.name in data}
    values.update(qk_norm=True, tie_word_embeddings=False, layer_module="Qwen2MoTDecoderLayer")
    if data.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"llm_config.json: hidden_act {data['hidden_act']!r} is not silu")
    return _build(LLMConfig, values, "llm_config.json")


def vit_config_to_json(cfg: ViTConfig) -> dict[str, Any]:
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers + 1,  # the file counts the unused last layer
        "num_attention_heads": cfg.num_attention_heads,
        "patch_size": cfg.patch_size,
        "image_size": cfg.image_size,
        "num_channels": cfg.num_channels,
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_act": cfg.hidden_act,
        "attention_dropout": 0.0,
    }


def vit_config_from_json(data: dict[str, Any]) -> ViTConfig:
    values = {f.name: data[f.name] for f in fields(ViTConfig) if f.name in data}
    if "num_hidden_layers" in values:
        values["num_hidden_layers"] = int(values["num_hidden_layers"]) - 1
    return _build(ViTConfig, values, "vit_config.json")


def _build(cls: type, values: dict[str, Any], source: str) -> Any:
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----- presets ------------------------------------------------------------------------------------


def _load_think_prompts(name: str) -> dict[str, str]:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))["think_system_prompts"]


PRESETS: dict[str, BagelConfig] = {
    "bagel-7b-mot": BagelConfig(think_system_prompts=_load_think_prompts("bagel-7b-mot")),
    # A few-MB random model for unit tests: every code path, seconds on a CPU.
    "tiny": BagelConfig(
        llm=LLMConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096,
        ),
        vit=ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      patch_size=8, image_size=512),
        vae=VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=16),
        max_latent_size=16,
        vit_max_num_patch_per_side=64,
        vae_transform=ImageTransformConfig(max_size=256, min_size=32, stride=16),
        vit_transform=ImageTransformConfig(max_size=256, min_size=32, stride=8),
        default_image_size=(64, 64),
        think_system_prompts={
            "generation": "think about the layout, then draw.",
            "understanding": "think about the image, then answer.",
        },
        extra_special_tokens=("<think>", "</think>"),
    ),
    # The embedded model: a small BAGEL trained from scratch on the Shapes world (64x64 images).
    "shapes-tiny": BagelConfig(
        llm=LLMConfig(
            hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096,
        ),
        vit=ViTConfig(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=3,
                      patch_size=16, image_size=128),
        vae=VAEConfig(ch=16, ch_mult=(1, 2, 4, 4), num_res_blocks=1, z_channels=16, norm_groups=4),
        max_latent_size=8,
        vit_max_num_patch_per_side=8,
        vae_transform=ImageTransformConfig(max_size=64, min_size=32, stride=16),
        # The ViT sees the 64-px canvas upscaled to 128 (as the official transform upscales to 224):
        # 64 patches of 8 canvas pixels, fine enough to tell apart objects in 21-px cells.
        vit_transform=ImageTransformConfig(max_size=128, min_size=128, stride=16),
        default_image_size=(64, 64),
        think_system_prompts={
            "generation": "plan the picture inside <think></think> before you draw or edit it.",
            "understanding": "list the facts you see inside <think></think> before you answer.",
        },
        # Decoding stops at </think> or the end of the answer; the cap sits above the longest canonical
        # text (a thought, then a `describe` caption: ~380 tokens in the shipped character-level vocabulary;
        # tests/test_shapes_tasks.py). Edits take text guidance 2 instead of BAGEL's 4: +2.5 to +5 points
        # of exact edits on five held-out sets; text-to-image 3: +1.6 to +7.5 points of partial prompts on
        # five sets, full captions within a task (MODEL_CARD.md, "Sampler settings").
        task_defaults={
            "generate": {"num_timesteps": 20, "cfg_text_scale": 3.0, "max_think_token_n": 448},
            "edit": {"num_timesteps": 20, "cfg_text_scale": 2.0, "max_think_token_n": 448},
            "understand": {"max_think_token_n": 448},
        },
        extra_special_tokens=("<think>", "</think>"),
    ),
}


def preset(name: str, **overrides: Any) -> BagelConfig:
    """A named configuration, optionally with top-level fields replaced."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)
