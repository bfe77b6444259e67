"""Property-based tests (hypothesis) of the sampler settings and of the packing invariants.

The settings tests state the valid region once, independently of the code (`valid_flow`), and check
that `FlowParams` and `settings.resolve` accept exactly that region, for values drawn from everywhere
(NaN, infinities, negatives, booleans, strings). The packing tests complement tests/test_packing.py
(which checks masks against a brute-force reference): RoPE ids, labels, determinism, dropout and
token budgets, under random samples.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from openbagel.config import preset
from openbagel.data.batch import PAD, TEXT
from openbagel.data.interleaved import ImageItem, TextItem
from openbagel.data.packing import CAUSAL, IGNORE, NOISE, Packer, PackingConfig, collate, tokenize
from openbagel.data.sources import synthetic_source
from openbagel.inference.sampler import EPS, RENORM_TYPES, FlowParams, cfg_active, cfg_combine, timesteps
from openbagel.inference.settings import resolve
from openbagel.tokenizer import train_tokenizer

# ----- sampler settings ------------------------------------------------------------------------------

ANY_NUMBER = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-10**6, 10**6),
    st.sampled_from([0, 1, 2, 100, 1000, 1001, 0.0, 1.0, 100.0, 100.5, -0.0, 1e-9]),
)
ANY_VALUE = st.one_of(ANY_NUMBER, st.booleans(), st.none(), st.text(max_size=3))


def real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def valid_flow(v: dict) -> bool:
    """The documented valid region of every sampler setting (docs/usage.md, sampler.FlowParams)."""
    lo, hi = v["cfg_interval"]
    return (isinstance(v["num_timesteps"], int) and not isinstance(v["num_timesteps"], bool)
            and 2 <= v["num_timesteps"] <= 1000
            and real(v["timestep_shift"]) and 0 < v["timestep_shift"] <= 100
            and real(v["cfg_text_scale"]) and 0 <= v["cfg_text_scale"] <= 100
            and real(v["cfg_img_scale"]) and 0 <= v["cfg_img_scale"] <= 100
            and real(lo) and real(hi) and 0 <= lo <= hi <= 1
            and v["cfg_renorm_type"] in RENORM_TYPES
            and real(v["cfg_renorm_min"]) and 0 <= v["cfg_renorm_min"] <= 1)


flow_values = st.fixed_dictionaries({
    "num_timesteps": st.one_of(st.integers(-5, 1100), st.sampled_from([2, 1000])),
    "timestep_shift": ANY_NUMBER,
    "cfg_text_scale": ANY_NUMBER,
    "cfg_img_scale": ANY_NUMBER,
    "cfg_interval": st.tuples(ANY_NUMBER, ANY_NUMBER),
    "cfg_renorm_type": st.sampled_from([*RENORM_TYPES, "local", "", "GLOBAL"]),
    "cfg_renorm_min": ANY_NUMBER,
})


@settings(max_examples=300, deadline=None)
@given(flow_values)
def test_flow_params_accept_exactly_the_valid_region(values):
    try:
        params = FlowParams(**values)
    except ValueError as exc:
        assert not valid_flow(values), f"valid settings refused: {exc}"
        assert str(exc)  # a message that names the setting
        return
    assert valid_flow(values), f"invalid settings accepted: {values}"
    assert params.cfg_interval == tuple(float(x) for x in values["cfg_interval"])


# The public names (aliases included) of the settings, and how their values are drawn.
SETTING_VALUES = {
    "num_inference_steps": st.one_of(st.integers(-3, 1003), ANY_VALUE),
    "guidance_scale": ANY_VALUE,
    "image_guidance_scale": ANY_VALUE,
    "timestep_shift": ANY_VALUE,
    "cfg_renorm_min": ANY_VALUE,
    "cfg_interval": st.one_of(st.tuples(ANY_NUMBER, ANY_NUMBER), ANY_VALUE),
    "max_new_tokens": st.one_of(st.integers(-2, 100_002), ANY_VALUE),
    "temperature": ANY_VALUE,
    "do_sample": ANY_VALUE,
}
PUBLIC_TO_FLOW = {"num_inference_steps": "num_timesteps", "guidance_scale": "cfg_text_scale",
                  "image_guidance_scale": "cfg_img_scale", "timestep_shift": "timestep_shift",
                  "cfg_renorm_min": "cfg_renorm_min", "cfg_interval": "cfg_interval"}


def valid_setting(name: str, value: object) -> bool:
    """One setting's valid region as a user sees it (numbers given as 3.0 for an integer are fine)."""
    if value is None:
        return True  # None means "the default"
    if name == "do_sample":
        return isinstance(value, bool)
    if name == "cfg_interval":
        return (isinstance(value, (list, tuple)) and len(value) == 2 and all(real(x) for x in value)
                and 0 <= value[0] <= value[1] <= 1)
    if not real(value):
        return False
    if name in ("num_inference_steps", "max_new_tokens"):
        top = 1000 if name == "num_inference_steps" else 100_000
        return value == int(value) and (2 if name == "num_inference_steps" else 1) <= value <= top
    if name == "temperature":
        return 0 < value <= 100
    if name == "timestep_shift":
        return 0 < value <= 100
    if name == "cfg_renorm_min":
        return 0 <= value <= 1
    return 0 <= value <= 100  # guidance scales


@settings(max_examples=300, deadline=None)
@given(task=st.sampled_from(["generate", "edit"]),
       overrides=st.fixed_dictionaries({}, optional=SETTING_VALUES))
def test_resolve_accepts_exactly_the_valid_settings(task, overrides):
    expected_ok = all(valid_setting(k, v) for k, v in overrides.items())
    try:
        resolved = resolve(task, overrides)
    except ValueError as exc:
        assert not expected_ok, f"valid settings {overrides} refused: {exc}"
        return
    assert expected_ok, f"invalid settings accepted: {overrides}"
    for public, field in PUBLIC_TO_FLOW.items():
        value = overrides.get(public)
        if value is not None:
            got = getattr(resolved.flow, field)
            assert got == (tuple(float(x) for x in value) if field == "cfg_interval" else value)


@given(st.fixed_dictionaries({}, optional={"guidance_scale": ANY_VALUE, "num_inference_steps": ANY_VALUE}))
def test_understanding_checks_then_ignores_image_settings(overrides):
    """An image setting passed to understanding is checked like generation's (a typo is an error), then unused."""
    try:
        resolve("generate", overrides)
    except ValueError:
        with pytest.raises(ValueError):
            resolve("understand", overrides)
    else:
        assert resolve("understand", overrides).flow is None


# ----- classifier-free guidance ----------------------------------------------------------------------


def velocities(draw, n: int, shape: tuple[int, int]) -> list[torch.Tensor]:
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scales = draw(st.lists(st.floats(0.01, 10), min_size=n, max_size=n))
    return [torch.randn(shape, generator=gen, dtype=torch.float64) * s for s in scales]


@st.composite
def guidance_case(draw):
    shape = (draw(st.integers(1, 6)), draw(st.integers(1, 8)))
    v_cond, v_text, v_img = velocities(draw, 3, shape)
    return dict(v_cond=v_cond, v_text=v_text, v_img=v_img, text_scale=draw(st.floats(0, 20)),
                img_scale=draw(st.floats(0, 20)), renorm_type=draw(st.sampled_from(RENORM_TYPES)),
                renorm_min=draw(st.floats(0, 1)))


@settings(max_examples=200, deadline=None)
@given(guidance_case())
def test_guidance_below_or_at_scale_one_is_the_conditional_velocity(case):
    case["text_scale"] = min(case["text_scale"], 1.0)
    assert cfg_combine(**case) is case["v_cond"]


@settings(max_examples=200, deadline=None)
@given(guidance_case())
def test_guidance_of_identical_predictions_changes_nothing(case):
    v = case["v_cond"]
    out = cfg_combine(v, v.clone(), v.clone(), case["text_scale"], case["img_scale"], case["renorm_type"],
                      case["renorm_min"])
    # Exact but for the renorm's EPS in the denominator, which image guidance can amplify.
    torch.testing.assert_close(out, v, rtol=0, atol=2 * EPS * (1 + case["img_scale"]))


@settings(max_examples=300, deadline=None)
@given(guidance_case())
def test_renorm_never_amplifies(case):
    """out = guided * clamp(|v_cond| / |guided|, renorm_min, 1): the guided velocity is never scaled up,
    and (global, channel) the result is no longer than max(|v_cond|, renorm_min * |guided|)."""
    assume(case["text_scale"] > 1.0)
    t = case["renorm_type"]
    v_cond, v_text, v_img = case["v_cond"], case["v_text"], case["v_img"]
    guided = v_text + case["text_scale"] * (v_cond - v_text)
    if t != "text_channel" and case["img_scale"] > 1.0:
        guided = v_img + case["img_scale"] * (guided - v_img)
    out = cfg_combine(**case)
    if t == "text_channel":  # renorm applies to the text-guided velocity, row by row, before image guidance
        case["img_scale"] = 1.0
        out = cfg_combine(**case)
    dims = None if t == "global" else -1

    def norm(x: torch.Tensor) -> torch.Tensor:
        return x.norm() if dims is None else x.norm(dim=-1)

    tol = 1e-9
    assert (norm(out) <= norm(guided) * (1 + tol) + tol).all()
    bound = torch.maximum(norm(v_cond), case["renorm_min"] * norm(guided))
    assert (norm(out) <= bound * (1 + tol) + tol).all()
    if case["renorm_min"] == 0:
        assert (norm(out) <= norm(v_cond) * (1 + tol) + tol).all()


@settings(max_examples=100, deadline=None)
@given(guidance_case(), st.floats(0.1, 10))
def test_guidance_is_scale_equivariant(case, a):
    """Scaling all three velocities scales the result (renorm ratios are scale free)."""
    out = cfg_combine(**case)
    scaled = cfg_combine(**{**case, "v_cond": a * case["v_cond"], "v_text": a * case["v_text"],
                            "v_img": a * case["v_img"]})
    torch.testing.assert_close(scaled, a * out, rtol=1e-6, atol=1e-6)


@given(st.integers(2, 1000), st.floats(0.01, 100))
def test_schedule_runs_from_one_to_zero_and_decreases(n, shift):
    t = timesteps(n, shift)
    assert t.shape == (n,) and abs(t[0] - 1) < 1e-6 and t[-1] == 0  # fp32, as the official grid
    assert (t[1:] < t[:-1]).all() and torch.isfinite(t).all()


@given(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1))
def test_cfg_interval_is_half_open(t, a, b):
    lo, hi = min(a, b), max(a, b)
    assert cfg_active(t, (lo, hi)) == (lo < t <= hi)


def test_cli_offers_exactly_the_sampler_renorm_types():
    from openbagel import cli

    assert tuple(cli.RENORM_TYPES) == RENORM_TYPES


# ----- packing ---------------------------------------------------------------------------------------

CFG = preset("tiny")
WORDS = ["red", "green", "blue", "left", "right", "top", "bottom", "what", "colour", "where"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([" ".join(p) for p in itertools.permutations(WORDS[:5], 3)] + WORDS, 300)


def packing(drop: float) -> PackingConfig:
    return PackingConfig(expected_num_tokens=64, max_num_tokens=1024, max_num_tokens_per_sample=1024,
                         text_cond_dropout_prob=drop, vae_cond_dropout_prob=drop, vit_cond_dropout_prob=drop)


text_item = st.builds(lambda w, loss: TextItem(" ".join(w), loss), st.lists(st.sampled_from(WORDS), max_size=4),
                      st.booleans())
image_item = st.builds(lambda w, h, loss, vae, vit: ImageItem(Image.new("RGB", (w, h), (9, 99, 199)), loss, vae,
                                                              vit or not (loss or vae)),
                       st.sampled_from([16, 32, 48]), st.sampled_from([16, 32]), st.booleans(), st.booleans(),
                       st.booleans())
samples = st.lists(st.one_of(text_item, image_item), min_size=1, max_size=5)


def splits(s) -> list[list[int]]:
    """Token indices of each split of a tokenized sample, in order."""
    out: dict[int, list[int]] = {}
    for i, sp in enumerate(s.split):
        out.setdefault(sp, []).append(i)
    return list(out.values())


@settings(max_examples=40, deadline=None)
@given(sample=samples, drop=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 99))
def test_rope_ids_and_labels(tok, sample, drop, seed):
    s = tokenize(sample, 0, tok, CFG, packing(drop), seed=seed)
    assert len({len(s.kind), len(s.text_ids), len(s.position_ids), len(s.labels), len(s.split), len(s.mode)}) == 1
    assert s.split == sorted(s.split), "splits are contiguous and in order"
    pos = s.position_ids
    assert all(b >= a for a, b in zip(pos, pos[1:])), "RoPE ids never go back"
    for idx in splits(s):
        ids = [pos[i] for i in idx]
        if s.mode[idx[0]] == CAUSAL:  # text: one position per token
            assert ids == list(range(ids[0], ids[0] + len(ids)))
            own = [s.labels[i] for i in idx]
            # Shifted labels: either all ignored, or each token predicts the next, the last nothing.
            assert set(own) == {IGNORE} or own == [s.text_ids[i] for i in idx[1:]] + [IGNORE]
        else:  # an image: every token (with its vision brackets) at one position
            assert len(set(ids)) == 1
            assert all(s.labels[i] == IGNORE for i in idx)
            assert s.kind[idx[0]] == s.kind[idx[-1]] == TEXT  # <|vision_start|> ... <|vision_end|>
    noisy = [idx for idx in splits(s) if s.mode[idx[0]] == NOISE]
    assert len(noisy) == sum(1 for item in sample if isinstance(item, ImageItem) and item.loss)
    assert len(s.timesteps_raw) == len(s.vae_images) == len(s.latent_position_ids)


@settings(max_examples=30, deadline=None)
@given(sample=samples, index=st.integers(0, 10**6), seed=st.integers(0, 10**6))
def test_tokenize_is_a_function_of_seed_and_index(tok, sample, index, seed):
    a = tokenize(sample, index, tok, CFG, packing(0.5), seed=seed)
    b = tokenize(sample, index, tok, CFG, packing(0.5), seed=seed)
    for name in ("kind", "text_ids", "position_ids", "labels", "split", "mode"):
        assert getattr(a, name) == getattr(b, name)
    for x, y in zip(a.timesteps_raw, b.timesteps_raw):
        assert torch.equal(x, y)


@settings(max_examples=30, deadline=None)
@given(sample=samples, seed=st.integers(0, 99))
def test_dropout_keeps_loss_tokens_and_spares_understanding(tok, sample, seed):
    kept = tokenize(sample, 0, tok, CFG, packing(0.0), seed=seed)
    dropped = tokenize(sample, 0, tok, CFG, packing(1.0), seed=seed)
    has_target = any(isinstance(item, ImageItem) and item.loss for item in sample)
    if not has_target:  # nothing to generate: dropout must not touch the sample
        assert dropped.text_ids == kept.text_ids and dropped.position_ids == kept.position_ids
    # Loss text and noisy targets are never dropped.
    assert sum(lab != IGNORE for lab in dropped.labels) == sum(lab != IGNORE for lab in kept.labels)
    assert dropped.mode.count(NOISE) == kept.mode.count(NOISE)
    assert dropped.num_tokens <= kept.num_tokens


@settings(max_examples=15, deadline=None)
@given(expected=st.integers(40, 200), extra=st.integers(0, 100), rows=st.integers(1, 3), seed=st.integers(0, 50))
def test_packer_rows_respect_the_budget_and_never_repeat_a_sample(tok, expected, extra, rows, seed):
    cfg = PackingConfig(expected_num_tokens=expected, max_num_tokens=expected + extra + 60,
                        max_num_tokens_per_sample=expected + extra + 60, rows_per_batch=rows, max_buffer=4)
    packer = Packer(synthetic_source(seed=seed, image_size=32), tok, CFG, cfg, seed=seed)
    used: list[int] = []
    for _ in range(3):
        batch = packer.next_batch()
        real_tokens = (batch.token_kind != PAD).sum(1)
        assert batch.token_kind.shape[0] == rows
        assert (real_tokens <= cfg.max_num_tokens).all()
        assert batch.attn_mask.any(-1).all(), "every query row sees at least one key"
        assert torch.diagonal(batch.attn_mask[:, 0], dim1=-2, dim2=-1).all(), "every token sees itself"
        used += batch.sample_ids
    assert len(used) == len(set(used))


@settings(max_examples=20, deadline=None)
@given(st.lists(samples, min_size=1, max_size=4))
def test_collate_keeps_each_sample_inside_its_own_block(tok, batch_samples):
    toks = [tokenize(s, i, tok, CFG, packing(0.0), seed=0) for i, s in enumerate(batch_samples)]
    batch = collate([toks], packing(0.0))
    mask = batch.attn_mask[0, 0]
    start = 0
    for s in toks:
        end = start + s.num_tokens
        assert not mask[start:end, :start].any() and not mask[start:end, end:].any()
        torch.testing.assert_close(batch.position_ids[0, start:end], torch.tensor(s.position_ids))
        start = end
    assert (batch.token_kind[0, start:] == PAD).all()
