"""The inference engine and pipeline on a small random model: every task, think, guidance, seeds, sessions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from openbagel.inference.kv_cache import KVCache
from openbagel.inference.pipeline import InputError, Request, split_thought
from openbagel.inference.sampler import FlowParams, cfg_active, cfg_combine, timesteps
from openbagel.inference.session import EditSession

FAST = dict(num_inference_steps=4)


def _px(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def source() -> Image.Image:
    from openbagel.shapes.render import render
    from openbagel.shapes.scene import Obj, Scene

    return render(Scene("black", (Obj("circle", "red", "large", "center"),)))


# ----- sampler maths -------------------------------------------------------------------------------


def test_schedule_matches_the_reference_values():
    ts = timesteps(50, 3.0)
    assert ts[0] == 1.0 and ts[-1] == 0.0 and len(ts) == 50
    assert abs(float(ts[1]) - 0.9931) < 1e-4 and abs(float(ts[-2]) - 0.0588) < 1e-4
    active = sum(cfg_active(float(t), (0.4, 1.0)) for t in ts[:-1])
    assert active == 41  # reference 5.3: with [0.4, 1.0] and shift 3, 41 of 49 steps use CFG


@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
def test_cfg_combine(renorm):
    g = torch.Generator().manual_seed(0)
    v_c, v_t, v_i = (torch.randn(16, 64, generator=g) for _ in range(3))
    assert torch.equal(cfg_combine(v_c, v_t, v_i, 1.0, 2.0, renorm, 0.0), v_c)  # no text CFG: no guidance at all
    out = cfg_combine(v_c, v_t, None, 4.0, 1.0, renorm, 0.0)
    raw = v_t + 4.0 * (v_c - v_t)
    if renorm == "global":
        assert out.norm() <= v_c.norm() * (1 + 1e-6)
        assert torch.allclose(out / out.norm(), raw / raw.norm(), atol=1e-6)
    else:
        assert bool((out.norm(dim=-1) <= v_c.norm(dim=-1) * (1 + 1e-6)).all())
    # renorm_min = 1 disables the renorm.
    assert torch.allclose(cfg_combine(v_c, v_t, None, 4.0, 1.0, renorm, 1.0), raw, atol=1e-6)
    if renorm == "text_channel":  # image guidance applies after the renorm, un-normalised
        both = cfg_combine(v_c, v_t, v_i, 4.0, 2.0, renorm, 0.0)
        assert torch.allclose(both, v_i + 2.0 * (out - v_i), atol=1e-6)


def test_flow_params_reject_bad_values():
    for bad in (dict(num_timesteps=1), dict(cfg_text_scale=float("nan")), dict(cfg_interval=(0.5, 0.2)),
                dict(cfg_renorm_type="local"), dict(timestep_shift=0.0)):
        with pytest.raises(ValueError):
            FlowParams(**bad)


# ----- tasks ---------------------------------------------------------------------------------------


def test_generate_is_reproducible_and_seeded(tiny_pipeline):
    a = tiny_pipeline.generate("a red circle", seed=3, **FAST).images[0]
    b = tiny_pipeline.generate("a red circle", seed=3, **FAST).images[0]
    c = tiny_pipeline.generate("a red circle", seed=4, **FAST).images[0]
    assert a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(_px(a), _px(b))
    assert not np.array_equal(_px(a), _px(c))
    g = torch.Generator().manual_seed(3)
    assert np.array_equal(_px(tiny_pipeline.generate("a red circle", generator=g, **FAST).images[0]), _px(a))


def test_generate_any_size_and_aliases(tiny_pipeline):
    out = tiny_pipeline.generate("a square", height=32, width=48, guidance_scale=2.0, **FAST)
    assert out.images[0].size == (48, 32)
    with pytest.raises(InputError, match="multiple of 16"):
        tiny_pipeline.generate("a square", height=40)


def test_edit_and_rgba_input(tiny_pipeline, source):
    out = tiny_pipeline.edit(source, "make the circle blue", seed=0, image_guidance_scale=1.5, **FAST)
    assert out.images[0].size == source.size
    rgba = source.convert("RGBA")
    same = tiny_pipeline.edit(rgba, "make the circle blue", seed=0, image_guidance_scale=1.5, **FAST)
    assert np.array_equal(_px(out.images[0]), _px(same.images[0]))  # opaque RGBA == RGB


def test_understand_and_streaming(tiny_pipeline, source):
    seen: list[str] = []
    out = tiny_pipeline.understand(source, "what color is the circle?", max_new_tokens=6,
                                   on_text=lambda row, text: seen.append(text))
    assert isinstance(out.text, str) and out.raw_text is not None
    # Streamed texts grow monotonically and end at the final text (partial UTF-8 is held back).
    assert all(seen[i + 1].startswith(seen[i]) for i in range(len(seen) - 1))
    assert not seen or out.raw_text.startswith(seen[-1])
    sampled = [tiny_pipeline.understand(source, "what?", do_sample=True, temperature=1.0, top_k=50, top_p=0.9,
                                        max_new_tokens=6, seed=s).raw_text for s in (1, 1)]
    assert sampled[0] == sampled[1]


def test_think_mode_generates_a_thought_first(tiny_pipeline, source):
    calls = []
    out = tiny_pipeline.edit(source, "make the circle blue", think=True, max_think_tokens=5, seed=0,
                             on_text=lambda r, t: calls.append(t), **FAST)
    assert out.raw_text is not None and calls
    assert split_thought("<think>the circle is red. so: make it blue</think> done") == (
        "the circle is red. so: make it blue", "done")
    assert split_thought("<think>the circle is re") == ("the circle is re", "")  # cut by the token limit
    assert split_thought("blue") == (None, "blue")


def test_decoding_reports_why_it_stopped_and_its_tokens(tiny_pipeline, source):
    """finish_reason is "length" exactly when the token limit ended the text; the counts are the context
    the answer read and the tokens written."""
    for limit in (1, 3, 40):
        out = tiny_pipeline.understand(source, "what color is the circle?", max_new_tokens=limit, seed=0)
        assert 0 <= out.completion_tokens <= limit
        assert out.finish_reason == ("length" if out.completion_tokens == limit else "stop")
        assert out.prompt_tokens > 0 and "<think>" not in out.text
    drawn = tiny_pipeline.edit(source, "make the circle blue", think=True, max_think_tokens=2, seed=0, **FAST)
    assert drawn.completion_tokens <= 2 and drawn.finish_reason in ("stop", "length")
    assert tiny_pipeline.edit(source, "make the circle blue", seed=0, **FAST).finish_reason is None  # no text


def test_cfg_interval_controls_guidance_forwards(tiny_pipeline):
    """Each denoising forward batches the active branches; outside the interval only v_cond runs."""
    rows: list[int] = []
    lm = tiny_pipeline.engine.model.language_model.model
    hook = lm.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        tiny_pipeline.generate("a red circle", seed=0, num_inference_steps=6, cfg_interval=(0.5, 1.0),
                               cfg_img_scale=1.0)
    finally:
        hook.remove()
    ts = timesteps(6, 3.0)
    expected = [2 if cfg_active(float(t), (0.5, 1.0)) else 1 for t in ts[:-1]]
    assert rows[-5:] == expected and 1 in expected and 2 in expected


def test_batched_tasks_match_single_tasks(tiny_pipeline, source):
    reqs = [Request("generate", "a red circle", seed=1, settings=dict(FAST)),
            Request("edit", "make it blue", source, seed=2, settings=dict(FAST)),
            Request("generate", "two squares", seed=5, settings=dict(FAST))]
    batched = tiny_pipeline.run(reqs)
    for req, out in zip(reqs, batched):
        single = tiny_pipeline.run([req])[0]
        assert np.abs(_px(single.images[0]) - _px(out.images[0])).max() <= 1


def test_callback_on_step_end_sees_and_replaces_latents(tiny_pipeline):
    steps = []

    def cb(pipe, step, t, kwargs):
        steps.append(step)
        return {"latents": [torch.zeros_like(x) for x in kwargs["latents"]]}

    a = tiny_pipeline.generate("a red circle", seed=1, callback_on_step_end=cb, **FAST).images[0]
    b = tiny_pipeline.generate("a blue square", seed=9, callback_on_step_end=cb, **FAST).images[0]
    assert steps == [0, 1, 2, 0, 1, 2]
    assert np.array_equal(_px(a), _px(b))  # both decode the zero latent


# ----- caches --------------------------------------------------------------------------------------


def test_incremental_prefill_equals_one_block(tiny_pipeline):
    eng, tok = tiny_pipeline.engine, tiny_pipeline.tokenizer
    a, b = tok.text_block("make the square blue"), tok.text_block("what color is the triangle?")
    one = eng.new_cache(1)
    eng.prefill_text(one, [a + b])
    two = eng.new_cache(1)
    eng.prefill_text(two, [a])
    eng.prefill_text(two, [b])
    assert int(one.rope[0]) == int(two.rope[0]) == len(a) + len(b)
    for k1, k2 in zip(one.k, two.k):
        assert torch.allclose(k1[:, :, :one.used], k2[:, :, :two.used], atol=1e-5)


def test_padded_batch_rows_equal_separate_rows(tiny_pipeline):
    """Rows of unequal length in one cache leave gaps; `stack` compacts them to the same keys."""
    eng, tok = tiny_pipeline.engine, tiny_pipeline.tokenizer
    short, long_ = tok.text_block("red"), tok.text_block("a large red circle at the top left")
    both = eng.new_cache(2)
    eng.prefill_text(both, [short, long_])
    eng.prefill_text(both, [long_, short])
    alone = eng.new_cache(1)
    eng.prefill_text(alone, [short])
    eng.prefill_text(alone, [long_])
    packed = KVCache.stack([(both, 0)])
    n = int(alone.valid.sum())
    assert int(packed.valid.sum()) == n
    assert torch.allclose(packed.k[0][0, :, :n], alone.k[0][0, :, :n], atol=1e-5)


def test_image_prefill_computes_only_the_rows_it_fills(tiny_pipeline, source):
    """An input image enters the gen row, not the cfg_img row after it: that row is not computed,
    and the gen row's keys equal those of a cache that holds the gen row alone."""
    from openbagel.processing import to_tensor

    eng = tiny_pipeline.engine
    image = to_tensor(source.resize((64, 64)))
    rows_seen: list[int] = []
    layer = eng.model.language_model.model.layers[0]
    hook = layer.register_forward_hook(lambda mod, args, out: rows_seen.append(args[0].shape[0]))
    try:
        both, alone = eng.new_cache(2), eng.new_cache(1)
        eng.prefill_vit_images(both, [image, None])
        eng.prefill_vit_images(alone, [image])
    finally:
        hook.remove()
    assert rows_seen == [1, 1]
    n = int(alone.valid.sum())
    assert n > 0 and int(both.valid[0].sum()) == n and int(both.valid[1].sum()) == 0
    assert both.used == alone.used and int(both.rope[0]) == int(alone.rope[0]) and int(both.rope[1]) == 0
    assert torch.allclose(both.k[0][0, :, :n], alone.k[0][0, :, :n], atol=1e-6)


def test_decoding_stops_at_the_models_last_position(tiny_pipeline):
    from dataclasses import replace

    from openbagel.inference.engine import TextParams

    eng, tok = tiny_pipeline.engine, tiny_pipeline.tokenizer
    cfg = eng.cfg
    cache = eng.new_cache(1)
    eng.prefill_text(cache, [tok.text_block("a large red circle at the top left")])
    used = int(cache.rope[0])
    params = TextParams(max_new_tokens=500, do_sample=True, temperature=5.0)
    try:
        eng.cfg = replace(cfg, llm=replace(cfg.llm, max_position_embeddings=used + 4))
        ids = eng.decode(cache.fork(), params, [torch.Generator().manual_seed(0)])
        assert len(ids[0]) <= 3
        eng.cfg = replace(cfg, llm=replace(cfg.llm, max_position_embeddings=used))
        assert eng.decode(cache.fork(), params) == [[]]
    finally:
        eng.cfg = cfg


def test_layer_offload_matches_and_keeps_layers_off_the_device(tiny_checkpoint, tiny_pipeline, source):
    """`offload=True` streams each decoder layer in when it runs (on CPU the mechanics are the same:
    between calls the layers' parameters are placeholders on the meta device)."""
    from openbagel.inference.offload import offloaded
    from openbagel.inference.pipeline import BagelPipeline

    pipe = BagelPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype="fp32", offload=True)
    pipe.set_progress_bar_config(disable=True)
    assert offloaded(pipe.engine.model) and not offloaded(tiny_pipeline.engine.model)
    assert {p.device.type for p in pipe.engine.model.language_model.model.layers.parameters()} == {"meta"}
    for run in (lambda q: q.edit(source, "make it blue", seed=5, num_inference_steps=3).images[0],
                lambda q: q.generate("a red circle", seed=5, num_inference_steps=3).images[0]):
        assert np.array_equal(np.asarray(run(pipe)), np.asarray(run(tiny_pipeline)))
    assert (pipe.understand(source, "what?", max_new_tokens=4).raw_text
            == tiny_pipeline.understand(source, "what?", max_new_tokens=4).raw_text)
    assert {p.device.type for p in pipe.engine.model.language_model.model.layers.parameters()} == {"meta"}


# ----- sessions and batch files ---------------------------------------------------------------------


def test_session_undo_save_restore(tiny_pipeline, source, tmp_path):
    s = tiny_pipeline.session(source, seed=1, **FAST)
    s.edit("make the circle blue")
    second = s.edit("add a square")
    s.save(tmp_path / "sess")
    restored = EditSession.load(tiny_pipeline, tmp_path / "sess")
    assert [t.instruction for t in restored.turns] == ["make the circle blue", "add a square"]
    x = s.edit("remove the circle", seed=7).images[0]
    y = restored.edit("remove the circle", seed=7).images[0]
    assert np.array_equal(_px(x), _px(y))
    s.undo()
    assert np.array_equal(_px(s.image), _px(second.images[0]))
    z = s.edit("remove the circle", seed=7).images[0]
    assert np.array_equal(_px(x), _px(z))
    s.undo(), s.undo(), s.undo()
    with pytest.raises(InputError, match="nothing to undo"):
        s.undo()


def test_batch_file_with_bad_lines(tiny_pipeline, source, tmp_path):
    from openbagel.inference.batch import run_batch_file

    source.save(tmp_path / "src.png")
    lines = [
        {"id": "g", "task": "generate", "prompt": "a red circle", "seed": 1},
        "not json",
        {"id": "e", "task": "edit", "image": "src.png", "instruction": "make it blue"},
        {"id": "u", "task": "understand", "image": "src.png", "question": "what color?"},
        {"id": "x", "task": "paint", "prompt": "?"},
        {"id": "esc", "task": "edit", "image": "../outside.png", "instruction": "x"},
        {"id": "c", "task": "chat", "image": "src.png", "turns": ["make it blue", "add a square"], "think": True},
    ]
    (tmp_path / "tasks.jsonl").write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines))
    results = run_batch_file(tiny_pipeline, tmp_path / "tasks.jsonl", tmp_path / "out",
                             settings=dict(FAST, max_think_token_n=4))
    by_id = {r["id"]: r for r in results}
    assert [r["id"] for r in results][0] == "g" and len(results) == 7
    assert (tmp_path / "out" / by_id["g"]["image"]).is_file() and "error" not in by_id["g"]
    assert "not valid JSON" in results[1]["error"]
    assert "unknown task" in by_id["x"]["error"]
    assert "leaves the task file's folder" in by_id["esc"]["error"]
    assert isinstance(by_id["u"]["text"], str)
    assert len(by_id["c"]["images"]) == 2 and "thought" in by_id["c"]
    written = [json.loads(l)["id"] for l in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert written == [r["id"] for r in results]


def test_inference_builds_no_autograd_graph(tiny_pipeline, source):
    """Every phase (prefills, denoising, decoding) runs without recording a graph for backward."""
    recorded: list[bool] = []
    hook = tiny_pipeline.engine.model.language_model.model.register_forward_hook(
        lambda module, args, out: recorded.append(out.requires_grad))
    try:
        tiny_pipeline.edit(source, "make the circle blue", seed=0, **FAST)
        tiny_pipeline.understand(source, "what color is the circle?", max_new_tokens=3)
    finally:
        hook.remove()
    assert recorded and not any(recorded)


def test_batch_rows_keep_their_own_text_settings(tiny_pipeline, source):
    """Rows of one batch with different token limits or sampling decode as they would alone."""
    from openbagel import Request

    requests = [Request("understand", "describe the image.", source, seed=1, settings={"max_new_tokens": 2}),
                Request("understand", "describe the image.", source, seed=1, settings={"max_new_tokens": 9}),
                Request("understand", "describe the image.", source, seed=3,
                        settings={"max_new_tokens": 9, "do_sample": True, "temperature": 1.0})]
    together = tiny_pipeline.run(requests)
    alone = [tiny_pipeline.run([r])[0] for r in requests]
    assert [o.raw_text for o in together] == [o.raw_text for o in alone]
    assert together[0].completion_tokens <= 2 < together[1].completion_tokens


def test_diffusers_conveniences(tiny_checkpoint, tiny_pipeline, source):
    import numpy as np

    from openbagel.inference.pipeline import BagelPipeline

    pipe = BagelPipeline.from_pretrained(tiny_checkpoint, device="cpu", torch_dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and tiny_pipeline.dtype == torch.float32
    defaults = tiny_pipeline.default_settings("edit")
    assert {"num_timesteps", "cfg_text_scale", "cfg_img_scale", "max_new_tokens"} <= set(defaults)
    a = tiny_pipeline.generate("a red circle", generator=[torch.Generator().manual_seed(4)], num_images_per_prompt=1,
                               callback_on_step_end_tensor_inputs=["latents"], num_inference_steps=np.int64(3),
                               guidance_scale=np.float32(2.0))
    b = tiny_pipeline.generate("a red circle", seed=np.int64(4), num_inference_steps=3, guidance_scale=2.0)
    assert a.images[0].tobytes() == b.images[0].tobytes()

    def wrong_shape(pipe_, step, t, kw):
        return {"latents": [x[:, :3] for x in kw["latents"]]}

    with pytest.raises(InputError, match="callback_on_step_end must return latents as it got them"):
        tiny_pipeline.generate("a red circle", seed=1, num_inference_steps=3, callback_on_step_end=wrong_shape)


def test_first_calls_from_several_threads_pack_each_weight_once():
    """oneDNN packs a weight on its first call: threads racing to it must all get the packed layer."""
    import threading

    from torch import nn

    from openbagel.inference.onednn import PackedLinear, available

    if not available(torch.device("cpu"), torch.float32):
        pytest.skip("oneDNN is not available in this torch build")
    torch.manual_seed(0)
    linear = nn.Linear(512, 512)
    x = torch.randn(8, 512)
    want = linear(x).detach()
    for _ in range(3):
        packed = PackedLinear(linear)
        start, results, errors = threading.Barrier(4), [], []

        def call():
            start.wait()
            try:
                with torch.no_grad():
                    results.append(packed(x))
            except Exception as exc:  # noqa: BLE001 - the test reports any failure of a thread
                errors.append(exc)

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(results) == 4
        assert all(torch.allclose(r, want, rtol=1e-4, atol=1e-5) for r in results)

