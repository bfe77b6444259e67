"""Engine speed-ups keep the results: batched guidance, step caching, int8 weights, torch.compile."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from openbagel.inference.quantize import (Int4Linear, Int8Embedding, Int8Linear, quantize, vision_linears,
                                          weight_bytes)
from openbagel.inference.step_cache import StepCacheConfig, newton_extrapolate


def _jobs(pipe, task: str, steps: int = 6) -> list:
    """The ImageJobs the pipeline builds for a task."""
    with pipe.engine.recording_jobs() as jobs:
        if task == "t2i":
            pipe.generate("a red circle", height=64, width=64, seed=0, num_inference_steps=steps)
        else:
            image = Image.new("RGB", (64, 64), (200, 30, 30))
            pipe.edit(image, "make the square blue", seed=0, num_inference_steps=steps)
    return jobs


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _generate(pipe, jobs, **options) -> torch.Tensor:
    eng = pipe.engine
    saved = {k: getattr(eng, k) for k in options}
    for k, v in options.items():
        setattr(eng, k, v)
    try:
        return eng.generate_images(jobs)[0]
    finally:
        for k, v in saved.items():
            setattr(eng, k, v)


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_batched_guidance_equals_one_branch_at_a_time(tiny_pipeline, task):
    jobs = _jobs(tiny_pipeline, task)
    batched = _generate(tiny_pipeline, jobs, batch_guidance=True)
    one_by_one = _generate(tiny_pipeline, jobs, batch_guidance=False)
    assert _rel(batched, one_by_one) < 1e-5


def test_newton_extrapolation_is_exact_for_polynomials():
    ts = [1.0, 0.8, 0.5]
    vs = [torch.tensor([3 * t * t - t + 2]) for t in ts]
    assert torch.allclose(newton_extrapolate(ts, vs, 0.3), torch.tensor([3 * 0.09 - 0.3 + 2]))
    assert torch.allclose(newton_extrapolate(ts[-2:], vs[-2:], 0.5), vs[-1])


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_step_cache_never_skipping_is_exact(tiny_pipeline, task):
    jobs = _jobs(tiny_pipeline, task)
    plain = _generate(tiny_pipeline, jobs)
    cached = _generate(tiny_pipeline, jobs, step_cache=StepCacheConfig(interval=1))
    assert torch.equal(plain, cached)


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_step_cache_keeps_guidance(tiny_pipeline, task):
    """Skipping every other step stays close to the full run and far from the unguided one."""
    jobs = _jobs(tiny_pipeline, task, steps=12)
    eng = tiny_pipeline.engine
    forwards = []
    hook = eng.model.language_model.model.register_forward_pre_hook(lambda m, a: forwards.append(a[0].shape[0]))
    try:
        cached = _generate(tiny_pipeline, jobs, step_cache=StepCacheConfig(interval=2, order=1))
    finally:
        hook.remove()
    plain = _generate(tiny_pipeline, jobs)
    unguided = _generate(tiny_pipeline, [replace(j, params=replace(j.params, cfg_text_scale=1.0)) for j in jobs])
    assert len(forwards) < 11  # some steps skipped
    assert max(forwards) == (3 if task == "edit" else 2)  # every branch still computed when it runs
    err, gap = _rel(cached, plain), _rel(unguided, plain)
    assert err < 0.05 and err < gap / 5, (err, gap)


def test_int8_linear_matches_fp32():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(5, 64)
    assert q.weight.dtype == torch.int8
    with torch.no_grad():
        assert _rel(q(x), lin(x)) < 1e-2


def test_int4_linear_stores_each_weight_at_its_nearest_level():
    """Groups of 64 inputs, one scale each: every weight dequantises to the nearest of 16 levels (the
    clipped +8 level aside, which costs no more than rounding), whatever the byte holding it."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64)
    q = Int4Linear.from_linear(lin)
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (64, 128) and q.scales.shape == (4, 64, 2)
    assert len(set(q.weight.flatten().tolist())) > 200  # nearly every byte value occurs
    assert not q.scales[..., 1].any()  # the kernel's zero points: symmetric levels need none
    w = torch.empty(64, 256)
    q._dequantize_rows(w, 0, 64)
    step = q.scales[..., 0].T.float().repeat_interleave(64, dim=1)
    err = (w - lin.weight.detach()).abs()
    assert (err <= step / 2 + 1e-7).all()
    levels = w / step
    assert torch.equal(levels, levels.round()) and levels.min() >= -8 and levels.max() <= 7
    x = torch.randn(5, 256)
    with torch.no_grad():
        assert 0.01 < _rel(q(x), lin(x)) < 0.15  # int4 is coarse: ~7% on Gaussian weights


@pytest.mark.parametrize("layer", [Int8Linear, Int4Linear])
def test_quantizing_a_block_of_rows_at_a_time_changes_nothing(layer, monkeypatch):
    """A large weight is quantised in bounded blocks of rows (the 7B's lm_head would otherwise take GBs of
    fp32 temporaries): the same bytes and scales as in one block, and the source weight is left as it was."""
    from openbagel.inference import quantize as quantize_module

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 1056)
    before = linear.weight.detach().clone()
    whole = layer.from_linear(linear)
    monkeypatch.setattr(quantize_module, "QUANTIZE_ELEMENTS", 128 * 70)  # int8: 70 rows a block, int4: 64;
    # both end on a partial block
    blocked = layer.from_linear(linear)
    assert torch.equal(blocked.weight, whole.weight) and torch.equal(blocked.scales, whole.scales)
    assert torch.equal(linear.weight.detach(), before)


def test_int4_needs_inputs_in_pairs_and_outputs_in_blocks_of_32():
    with pytest.raises(ValueError, match="in blocks of 32: a Linear with 63 inputs and 32 outputs"):
        Int4Linear.from_linear(torch.nn.Linear(63, 32))
    with pytest.raises(ValueError, match="a Linear with 64 inputs and 40 outputs"):
        Int4Linear.from_linear(torch.nn.Linear(64, 40))
    assert Int4Linear.from_linear(torch.nn.Linear(96, 32)).group_size == 32  # the largest even divisor up to 64


def test_int4_runs_a_few_rows_through_the_cpu_kernel(monkeypatch):
    """A generated token goes through PyTorch's CPU int4 kernel (bf16 activations), which reads the layout
    as `_dequantize_rows` does: the same result to bf16 precision, by another path."""
    from openbagel.inference import quantize as quantize_module

    if not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        pytest.skip("PyTorch's CPU int4 kernel reads another layout on this CPU (int4 dequantises instead)")
    torch.manual_seed(0)
    q = Int4Linear.from_linear(torch.nn.Linear(256, 128))
    assert quantize_module.cpu_int4_kernel(q.lanes)  # torch 2.13's x86 kernel reads our layout
    x = torch.randn(1, 3, 256)
    with torch.inference_mode():
        kernel = q(x)
        monkeypatch.setattr(quantize_module, "INT4_KERNEL_BELOW", 0)
        blocks = q(x)
    assert kernel.shape == blocks.shape == (1, 3, 128) and kernel.dtype == torch.float32
    assert not torch.equal(kernel, blocks) and _rel(kernel, blocks) < 1e-2
    if torch.backends.cpu.get_cpu_capability() == "AVX2":  # the probe tells a layout the kernel does not read
        with pytest.warns(RuntimeWarning, match="does not read our layout"):
            assert not quantize_module.cpu_int4_kernel(32)


@pytest.mark.parametrize("layer", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("tokens", [3, 300])  # 2 x 300 = 600 rows: the larger blocks of long prompts
def test_quantized_linear_blockwise_cpu_matmul_equals_dequantising_the_whole_weight(layer, tokens, monkeypatch):
    """On CPU the weight is dequantised a block of rows at a time (several blocks here, the last partial);
    with gradients on, the whole weight at once: the same numbers, and both near the fp32 layer."""
    from openbagel.inference import quantize as quantize_module

    monkeypatch.setattr(quantize_module, "INT4_KERNEL_BELOW", 0)  # blocks even for a few rows (kernel: above)
    torch.manual_seed(0)
    linear = torch.nn.Linear(192, 30_016)  # three int4 groups a row
    q = layer.from_linear(linear)
    x = torch.randn(2, tokens, 192)
    with torch.no_grad():
        got, plain = q(x), linear(x)
    whole = q(x.requires_grad_()).detach()
    assert got.shape == (2, tokens, 30_016) and torch.allclose(got, whole, rtol=1e-5, atol=1e-5)
    assert _rel(got, plain) < (0.01 if layer is Int8Linear else 0.15)


def test_quantized_layers_reuse_one_workspace_per_thread():
    """The CPU block buffers are kept per thread and shared by all layers: no fresh pages per call, two
    threads never write into the same buffer, and a buffer made under inference_mode stays writable."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from openbagel.inference.quantize import workspace

    torch.manual_seed(0)
    layers = [Int4Linear.from_linear(torch.nn.Linear(256, 96)), Int4Linear.from_linear(torch.nn.Linear(256, 64))]
    x = torch.randn(100, 256)  # enough rows to dequantise blocks (fewer go through the CPU int4 kernel)

    both_alive = threading.Barrier(2)  # two live threads at once: neither can reuse the other's buffer

    def in_a_fresh_thread() -> int:  # a new thread starts without a workspace
        with torch.inference_mode():
            first = [layer(x) for layer in layers]
        block = workspace("block", (64, 256), torch.float32)
        expected = torch.empty(64, 256)
        layers[1]._dequantize_rows(expected, 0, 64)
        assert torch.equal(block, expected)  # the last layer's weight went through this thread's buffer
        with torch.no_grad():
            again = [layer(x) for layer in layers]
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        both_alive.wait(timeout=60)
        return block.data_ptr()

    with ThreadPoolExecutor(2) as pool:
        one, two = pool.submit(in_a_fresh_thread), pool.submit(in_a_fresh_thread)
        assert one.result() != two.result()


def test_quantize_extras_false_leaves_the_embedding_and_the_vit(tiny_checkpoint):
    from openbagel.checkpoint import load_checkpoint

    model = load_checkpoint(tiny_checkpoint).model
    vit_names = [name for name, m in model.named_modules() if vision_linears(name, m)]
    quantize(model, "int4", extras=False)
    assert type(model.language_model.model.embed_tokens) is torch.nn.Embedding
    assert vit_names and all(type(model.get_submodule(name)) is torch.nn.Linear for name in vit_names)
    assert any(type(m) is Int4Linear for m in model.modules())


@pytest.mark.parametrize("layer", [Int8Linear, Int4Linear])
def test_quantized_layers_keep_bias_and_scales_in_the_dtype_asked_for(layer):
    """From a bf16 file into an fp32 model: int8 scales and every bias in fp32 (int4 scales stay bf16);
    without a dtype, the weight's."""
    linear = torch.nn.Linear(64, 32).to(torch.bfloat16)
    q = layer.from_linear(linear, dtype=torch.float32)
    assert q.bias.dtype == torch.float32 and torch.equal(q.bias, linear.bias.detach().float())
    assert q.scales.dtype == (torch.float32 if layer is Int8Linear else torch.bfloat16)
    assert layer.from_linear(linear).bias.dtype == torch.bfloat16
    w = torch.empty(32, 64)
    q._dequantize_rows(w, 0, 32)
    if layer is Int8Linear:
        w *= q.scales[:, None]
    assert _rel(w, linear.weight.detach().float()) < (0.01 if layer is Int8Linear else 0.1)


def test_int4_quantize_refuses_odd_layers_before_changing_any():
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Linear(7, 32))
    with pytest.raises(ValueError, match="in blocks of 32: 1 has 7 inputs and 32 outputs"):
        quantize(model, "int4", include=lambda name, m: isinstance(m, torch.nn.Linear))
    assert all(type(m) is torch.nn.Linear for m in model)


def test_int8_embedding_rows_within_a_step_of_the_table():
    torch.manual_seed(0)
    table = torch.nn.Embedding(20_000, 32)
    q = Int8Embedding.from_embedding(table)
    assert q.weight.dtype == torch.int8 and q.scales.shape == (20_000,)
    ids = torch.tensor([[0, 8191, 8192, 19_999], [5, 5, 17, 12_345]])  # across the quantisation blocks
    with torch.no_grad():
        got, want = q(ids), table(ids)
    assert got.dtype == torch.float32 and got.shape == want.shape
    step = want.abs().amax(dim=-1, keepdim=True) / 127
    assert ((got - want).abs() <= step / 2 + 1e-7).all()


@pytest.mark.parametrize("mode, shrink, tolerance", [("int8", 0.5, 0.05), ("int4", 0.25, 0.3)])
def test_quantized_pipeline_runs_and_shrinks(tiny_checkpoint, mode, shrink, tolerance):
    from openbagel.inference.pipeline import BagelPipeline

    pipe = BagelPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype="fp32", pack=False)
    pipe.set_progress_bar_config(disable=True)
    jobs = _jobs(pipe, "t2i")
    plain = _generate(pipe, jobs)
    llm = pipe.engine.model.language_model
    before = weight_bytes(llm)
    quantize(pipe.engine.model, mode)
    assert isinstance(llm.model.embed_tokens, Int8Embedding)
    vit_linears = [m for name, m in pipe.engine.model.named_modules() if name.startswith("vit_model.")
                   and isinstance(m, (torch.nn.Linear, Int8Linear, Int4Linear))]
    assert vit_linears and all(type(m) is Int8Linear for m in vit_linears)  # int8 in both modes
    assert weight_bytes(llm) < shrink * before
    out = _generate(pipe, jobs)
    assert _rel(out, plain) < tolerance
    assert pipe.understand(None, "what color is the triangle?", max_new_tokens=3).raw_text is not None


@pytest.mark.parametrize("mode, layer", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_quantized_loading_matches_quantizing_after_loading(tiny_checkpoint, mode, layer):
    """from_pretrained(quantize=...) quantises on the way to the device: the same model as quantize() after."""
    from openbagel.inference.pipeline import BagelPipeline

    after = BagelPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype="fp32")
    quantize(after.engine.model, mode)
    loaded = BagelPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype="fp32", quantize=mode)
    expected, got = after.engine.model.state_dict(), loaded.engine.model.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert any(isinstance(m, layer) for m in loaded.engine.model.modules())
    with pytest.raises(ValueError, match="unknown quantisation mode 'int3'"):
        BagelPipeline.from_pretrained(tiny_checkpoint, device="cpu", quantize="int3")
    with pytest.raises(ValueError, match="torchao-fp8 needs a CUDA GPU of compute capability 8.9"):
        BagelPipeline.from_pretrained(tiny_checkpoint, device="cpu", quantize="torchao-fp8")
    with pytest.raises(ValueError, match="torchao-fp8 needs a CUDA GPU"):
        quantize(after.engine.model, "torchao-fp8")
    with pytest.raises(ValueError, match="do not combine"):
        BagelPipeline.from_pretrained(tiny_checkpoint, device="cpu", quantize="int8", offload=True)


def test_mapped_checkpoint_tensors_are_copy_on_write(tiny_checkpoint, tmp_path):
    """Tensors kept as the file stores them are mapped one by one, privately: writing to one (a training
    step) works and leaves the file as it was."""
    import shutil

    from openbagel.checkpoint import load_checkpoint

    folder = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ck"))
    before = (folder / "ema.safetensors").read_bytes()
    model = load_checkpoint(folder, dtype=None).model
    weight = model.language_model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        weight.add_(1.0)
    assert (folder / "ema.safetensors").read_bytes() == before
    fresh = load_checkpoint(folder, dtype=None).model.language_model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(weight, fresh + 1.0)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_mapped_checkpoint_holds_a_few_file_descriptors(tiny_checkpoint):
    """Each mapping holds a file descriptor: a window of adjacent tensors takes one, not one per tensor
    (hundreds for a model, over the usual 1,024 limit for the 7B)."""
    from openbagel.checkpoint import load_checkpoint

    before = len(list(Path("/proc/self/fd").iterdir()))
    loaded = load_checkpoint(tiny_checkpoint, dtype=None, vae_dtype=None)  # every tensor stays mapped
    assert len(list(loaded.model.parameters())) > 100
    assert len(list(Path("/proc/self/fd").iterdir())) - before <= 2  # ema.safetensors, ae.safetensors


def test_quantized_loading_of_a_bf16_file_converts_one_layer_at_a_time(tiny_checkpoint, tmp_path):
    """A bf16 checkpoint quantised while loading on CPU: every tensor ends as int8 (the ViT, the embedding),
    uint8 (packed int4 weights), bf16 (their scales) or the compute dtype, and the model equals the one
    quantised after a full fp32 load."""
    from openbagel.checkpoint import load_checkpoint, save_checkpoint
    from openbagel.inference.pipeline import BagelPipeline

    ck = load_checkpoint(tiny_checkpoint)
    bf16 = save_checkpoint(tmp_path / "bf16", ck.config, ck.model, ck.vae, ck.tokenizer, dtype=torch.bfloat16)
    mapped = load_checkpoint(bf16, dtype=None)
    assert {p.dtype for p in mapped.model.parameters()} == {torch.bfloat16}  # as stored, nothing converted
    loaded = BagelPipeline.from_pretrained(bf16, device="cpu", dtype="fp32", quantize="int4")
    after = BagelPipeline.from_pretrained(bf16, device="cpu", dtype="fp32", pack=False)
    quantize(after.engine.model, "int4")
    got, expected = loaded.engine.model.state_dict(), after.engine.model.state_dict()
    assert {v.dtype for v in got.values()} == {torch.int8, torch.uint8, torch.bfloat16, torch.float32}
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


@pytest.mark.slow
def test_compiled_layers_match(tiny_pipeline):
    """Regional compilation: the layers share the compiled graphs of their halves around attention; same latents."""
    jobs = _jobs(tiny_pipeline, "edit", steps=3)
    plain = _generate(tiny_pipeline, jobs)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = _generate(tiny_pipeline, jobs, compile_step=True)
    tiny_pipeline.engine._compiled_layers = None
    assert _rel(compiled, plain) < 1e-5
    n_layers = len(tiny_pipeline.engine.model.language_model.model.layers)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # Both denoising steps run the same block (three guidance rows): one graph per half around attention,
    # shared by every layer.
    assert n_layers > 1 and graphs == 2, (graphs, n_layers)


def test_key_suffixes_equal_the_masked_attention():
    """Rows attending to suffixes of their keys without a mask = the same rows under a dense mask."""
    from openbagel.models.layers import KeySuffixes, attention

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(4, 4, 5, 8, generator=g), torch.randn(4, 2, 12, 8, generator=g), torch.randn(4, 2, 12, 8, generator=g)
    starts = [3, 3, 0, 7]
    spans = KeySuffixes.from_starts(starts)
    assert spans.groups == ((0, 2, 3), (2, 3, 0), (3, 4, 7))
    mask = (torch.arange(12)[None, :] >= torch.tensor(starts)[:, None])[:, None, None].expand(4, 1, 5, 12)
    torch.testing.assert_close(attention(q, k, v, spans), attention(q, k, v, mask))
    part = spans.rows(slice(1, 3))
    assert part.groups == ((0, 1, 3), (1, 2, 0))
    torch.testing.assert_close(attention(q[1:3], k[1:3], v[1:3], part), attention(q[1:3], k[1:3], v[1:3], mask[1:3]))


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_mask_free_denoising_equals_the_masked_path(tiny_pipeline, task, monkeypatch):
    """Guidance contexts of unequal lengths are right-aligned, so the denoising loop attends without a
    mask; forcing the dense mask gives the same latents."""
    from openbagel.inference.kv_cache import KVCache
    from openbagel.models import qwen2_mot
    from openbagel.models.layers import KeySuffixes

    jobs = _jobs(tiny_pipeline, task)
    seen: list[object] = []
    real = qwen2_mot.attention
    monkeypatch.setattr(qwen2_mot, "attention", lambda q, k, v, mask: seen.append(mask) or real(q, k, v, mask))
    mask_free = _generate(tiny_pipeline, jobs)
    assert seen and all(isinstance(m, KeySuffixes) for m in seen)
    assert len({g[2] for g in seen[0].groups}) == len(seen[0].groups) > 1  # contexts of unequal lengths
    monkeypatch.setattr(KVCache, "first_valid", lambda self: None)
    seen.clear()
    masked = _generate(tiny_pipeline, jobs)
    assert seen and all(isinstance(m, torch.Tensor) for m in seen)
    assert _rel(mask_free, masked) < 1e-5


def test_many_short_contexts_attend_under_one_mask(tiny_pipeline, monkeypatch):
    """A batch of edits with prompts of different lengths and small images: one masked call per layer,
    not one unmasked call per context length."""
    from openbagel.inference.pipeline import Request
    from openbagel.models import qwen2_mot

    image = Image.new("RGB", (64, 64), (200, 30, 30))
    texts = ["make it blue", "remove the red circle", "move the triangle to the left", "make the square green"]
    seen: list[object] = []
    real = qwen2_mot.attention
    monkeypatch.setattr(qwen2_mot, "attention", lambda q, k, v, mask: seen.append(mask) or real(q, k, v, mask))
    tiny_pipeline.run([Request(task="edit", text=t, image=image, seed=0, settings={"num_inference_steps": 3})
                       for t in texts])
    denoising = [m for m in seen if isinstance(m, torch.Tensor) and m.shape[0] == 3 * len(texts)]
    assert denoising, "the denoising loop ran its rows under one dense mask"


def test_column_span_routing_matches_the_gather_path():
    """A denoising block (boundary, latents, boundary in every row) routes by slices; same result as gathers."""
    from openbagel.models.qwen2_mot import ExpertRouting

    B, L, C = 3, 7, 5
    gen_mask = torch.zeros(B, L, dtype=torch.bool)
    gen_mask[:, 1:6] = True
    span = ExpertRouting.from_mask(gen_mask)
    assert span.gen_cols == (1, 6)
    gather = ExpertRouting.by_index(gen_mask)
    und, gen = torch.nn.Linear(C, 4), torch.nn.Linear(C, 4)
    x = torch.randn(B, L, C)
    torch.testing.assert_close(span.apply(x, und, gen), gather.apply(x, und, gen), rtol=0, atol=0)
    # A long block (a real image): the generation expert runs on the whole block, the boundary is overwritten.
    gen_mask = torch.zeros(B, 130, dtype=torch.bool)
    gen_mask[:, 1:129] = True
    x = torch.randn(B, 130, C)
    torch.testing.assert_close(ExpertRouting.from_mask(gen_mask).apply(x, und, gen),
                               ExpertRouting.by_index(gen_mask).apply(x, und, gen))  # GEMM blocking: 1 ulp
    gen_mask = torch.zeros(B, L, dtype=torch.bool)
    gen_mask[:, 1:6] = True
    # Rows that differ, or a gap in the generation tokens, keep the gather path.
    gen_mask[1, 5] = False
    assert ExpertRouting.from_mask(gen_mask).gen_cols is None
    gapped = torch.zeros(1, L, dtype=torch.bool)
    gapped[0, [1, 2, 4]] = True
    assert ExpertRouting.from_mask(gapped).gen_cols is None
    # A packed training batch whose first row has no generation tokens (regression: crashed on cols[0]).
    first_row_empty = torch.zeros(2, L, dtype=torch.bool)
    first_row_empty[1, 2:4] = True
    routing = ExpertRouting.from_mask(first_row_empty)
    assert routing.gen_cols is None
    x = torch.randn(2, L, C)
    expected = und(x)
    expected[1, 2:4] = gen(x[1, 2:4])
    torch.testing.assert_close(routing.apply(x, und, gen), expected)


def test_onednn_packed_linears_match_and_refuse_quantisation(tiny_checkpoint):
    """Packed layers give the unpacked outputs; a packed model cannot be quantised by mistake."""
    from openbagel.inference.onednn import PackedLinear, pack_linears, packable_linears, unpack_linears
    from openbagel.inference.pipeline import BagelPipeline

    assert packable_linears("language_model.model.layers.0.mlp.up_proj", torch.nn.Linear(512, 512))
    assert not packable_linears("language_model.model.layers.0.mlp.up_proj", torch.nn.Linear(64, 128))
    assert not packable_linears("vae2llm", torch.nn.Linear(512, 512))
    default = BagelPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype="fp32")
    assert not any(isinstance(m, PackedLinear) for m in default.engine.model.modules())  # 64 wide: too small

    pipe = BagelPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype="fp32", pack=False)
    pipe.set_progress_bar_config(disable=True)
    jobs = _jobs(pipe, "edit")
    plain = _generate(pipe, jobs)
    answer = pipe.understand(None, "what color is the triangle?", max_new_tokens=4).raw_text
    source = Image.new("RGB", (64, 64), (200, 30, 30))
    edited = torch.tensor(np.asarray(pipe.edit(source, "make the square blue", seed=1, num_inference_steps=3).images[0]))
    every_linear = lambda name, m: type(m) is torch.nn.Linear and name.startswith(("language_model.", "vit_model."))  # noqa: E731
    assert pack_linears(pipe.engine.model, every_linear) > 0
    assert _rel(_generate(pipe, jobs), plain) < 1e-5
    assert pipe.understand(None, "what color is the triangle?", max_new_tokens=4).raw_text == answer
    again = torch.tensor(np.asarray(pipe.edit(source, "make the square blue", seed=1, num_inference_steps=3).images[0]))
    assert (again.int() - edited.int()).abs().max() <= 1  # whole edit, prefills included: pixel rounding at most
    with pytest.raises(ValueError, match="packed for oneDNN"):
        quantize(pipe.engine.model, "int8")
    packed = sum(isinstance(m, PackedLinear) for m in pipe.engine.model.modules())
    assert unpack_linears(pipe.engine.model) == packed  # what the engine does before compiling
    assert not any(isinstance(m, PackedLinear) for m in pipe.engine.model.modules())
    assert torch.equal(_generate(pipe, jobs), plain)
    with pytest.raises(ValueError, match="pack=True needs fp32 weights on CPU"):
        BagelPipeline.from_pretrained(tiny_checkpoint, device="cpu", quantize="int8", pack=True)


def _rss_file_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_packing_is_lazy_and_drops_the_file_pages_of_a_packed_weight(tmp_path):
    """A layer packs on first call; its checkpoint pages then leave RSS; anonymous memory is never dropped."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from openbagel.checkpoint import release_file_pages
    from openbagel.inference.onednn import PackedLinear

    save_file({"w": torch.randn(2048, 2048)}, str(tmp_path / "w.safetensors"))  # 16 MiB
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt", device="cpu") as f:
        mapped = f.get_tensor("w")
    linear = torch.nn.Linear(2048, 2048, bias=False)
    linear.weight = torch.nn.Parameter(mapped, requires_grad=False)
    expected = linear(torch.ones(3, 2048))  # reads every page of the mapping
    PackedLinear(torch.nn.Linear(2048, 2048))(torch.ones(3, 2048))  # oneDNN's code pages, mapped on first use
    layer = PackedLinear(linear)
    assert layer.packed is None  # nothing reordered yet
    before = _rss_file_kib()
    torch.testing.assert_close(layer(torch.ones(3, 2048)), expected, rtol=1e-5, atol=1e-4)
    assert layer.packed is not None
    assert before - _rss_file_kib() > 12 * 1024  # the 16 MiB weight's pages were dropped
    anonymous = torch.randn(2048, 2048)
    copy = anonymous.clone()
    assert not release_file_pages(anonymous)
    assert torch.equal(anonymous, copy)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_quantizing_a_mapped_checkpoint_drops_the_pages_of_each_weight_it_replaced(tiny_checkpoint, tmp_path):
    """While the file's windows stay mapped (here: references kept to every original tensor; in a load,
    until the last small tensor of a window is converted), the pages of each quantised weight leave RSS."""
    from dataclasses import replace

    from openbagel.checkpoint import load_checkpoint, random_checkpoint
    from openbagel.config import preset
    from openbagel.tokenizer import BagelTokenizer

    cfg = preset("tiny")
    cfg = replace(cfg, llm=replace(cfg.llm, hidden_size=256, intermediate_size=8192))  # ~50 MB of Linear weights
    folder = random_checkpoint(tmp_path / "wide", cfg, BagelTokenizer.from_dir(tiny_checkpoint))
    model = load_checkpoint(folder, dtype=None).model
    originals = [p.data for p in model.parameters()]
    linear_bytes = sum(m.weight.numel() * 4 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                       and n.startswith("language_model."))
    sums = [float(t.float().sum()) for t in originals]  # every page read: resident
    before = _rss_file_kib()
    quantize(model, "int8", dtype=torch.float32)
    assert before - _rss_file_kib() > 0.8 * linear_bytes / 1024
    assert [float(t.float().sum()) for t in originals] == sums  # dropped pages fault back in unchanged
