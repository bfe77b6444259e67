"""User-facing generation settings: per-task defaults, aliases, validation.

One place turns keyword arguments (from Python, the CLI, the app or the server) into the engine's
`FlowParams` and `TextParams`, so every surface shares the same names, defaults and error messages.
Defaults follow the official notebook and app (reference 5.8); a checkpoint may override them.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from .engine import TextParams
from .sampler import FlowParams

TASKS = ("generate", "edit", "understand")

# BAGEL's names; the diffusers spellings map onto them.
ALIASES = {
    "guidance_scale": "cfg_text_scale",
    "image_guidance_scale": "cfg_img_scale",
    "num_inference_steps": "num_timesteps",
    "max_new_tokens": "max_think_token_n",
    "max_think_tokens": "max_think_token_n",
    "text_temperature": "temperature",
}

FLOW_KEYS = ("num_timesteps", "timestep_shift", "cfg_text_scale", "cfg_img_scale", "cfg_interval",
             "cfg_renorm_type", "cfg_renorm_min")
TEXT_KEYS = ("max_think_token_n", "do_sample", "temperature", "top_k", "top_p")

DEFAULTS: dict[str, dict[str, Any]] = {
    "generate": dict(num_timesteps=50, timestep_shift=3.0, cfg_text_scale=4.0, cfg_img_scale=1.0,
                     cfg_interval=(0.4, 1.0), cfg_renorm_type="global", cfg_renorm_min=0.0,
                     max_think_token_n=1000, do_sample=False, temperature=0.3, top_k=0, top_p=1.0),
    "edit": dict(num_timesteps=50, timestep_shift=3.0, cfg_text_scale=4.0, cfg_img_scale=2.0,
                 cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel", cfg_renorm_min=0.0,
                 max_think_token_n=1000, do_sample=False, temperature=0.3, top_k=0, top_p=1.0),
    "understand": dict(max_think_token_n=512, do_sample=False, temperature=0.3, top_k=0, top_p=1.0),
}


@dataclass(frozen=True)
class TaskSettings:
    flow: FlowParams | None
    text: TextParams


def resolve(task: str, overrides: dict[str, Any], checkpoint_defaults: dict[str, dict[str, Any]] | None = None
            ) -> TaskSettings:
    """Defaults for `task`, then the checkpoint's, then the caller's (None values are ignored)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    values = dict(DEFAULTS[task])
    unused: dict[str, Any] = {}
    for source in ((checkpoint_defaults or {}).get(task, {}), overrides):
        for key, value in source.items():
            if value is None:
                continue
            name = ALIASES.get(key, key)
            if name not in values and not (task == "understand" and name in FLOW_KEYS):
                allowed = sorted(set(values) | set(ALIASES))
                raise ValueError(f"unknown setting {key!r} for {task}; known settings: {', '.join(allowed)}")
            if name in FLOW_KEYS and task == "understand":
                unused[name] = _number(name, value)  # understanding draws no image: checked, then unused
                continue
            values[name] = _number(name, value)
    if unused:
        FlowParams(**{k: unused.get(k, DEFAULTS["generate"][k]) for k in FLOW_KEYS})  # raises on a bad value
    flow = FlowParams(**{k: values[k] for k in FLOW_KEYS}) if task != "understand" else None
    text = TextParams(max_new_tokens=values["max_think_token_n"], do_sample=bool(values["do_sample"]),
                      temperature=values["temperature"], top_k=values["top_k"], top_p=values["top_p"])
    return TaskSettings(flow, text)


def _number(name: str, value: Any) -> Any:
    """Reject NaN/inf and booleans-as-numbers early, with the setting's name in the message."""
    if name in ("cfg_renorm_type",):
        return value
    if name == "do_sample":
        if not isinstance(value, bool):
            raise ValueError(f"do_sample must be true or false, got {value!r}")
        return value
    if name == "cfg_interval":
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError(f"cfg_interval must be two numbers [start, end], got {value!r}")
        return tuple(_number("cfg_interval bound", v) for v in value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = int(value) if isinstance(value, numbers.Integral) else float(value)  # numpy scalars too
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if name in ("num_timesteps", "max_think_token_n", "top_k"):
        if value != int(value):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return int(value)
    return float(value)
