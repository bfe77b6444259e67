"""Trainer: loss normalisation, resume exactness, atomic save under a crash, export then load."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from openbagel.checkpoint import load_checkpoint
from openbagel.config import preset
from openbagel.data.packing import PackingConfig
from openbagel.data.sources import synthetic_source
from openbagel.models.bagel import LossTerms
from openbagel.models.layers import sincos_2d_table
from openbagel.processing import target_size
from openbagel.tokenizer import train_tokenizer
from openbagel.train import checkpointing
from openbagel.train.losses import LossWeights, objective
from openbagel.train.recipes import apply_overrides, tiny
from openbagel.train.trainer import Trainer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    texts = [x.text for _, s in itertools.islice(synthetic_source(0)(0, 1), 200) for x in s if hasattr(x, "text")]
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, 512, preset("tiny").extra_special_tokens).save(path)
    return path


def small(tokenizer_dir, **overrides):
    cfg = tiny()
    cfg.tokenizer = str(tokenizer_dir)
    cfg.data.image_size = 32
    cfg.packing = PackingConfig(expected_num_tokens=60, max_num_tokens=128, max_num_tokens_per_sample=128,
                                rows_per_batch=2)
    cfg.steps, cfg.progress, cfg.export_ema, cfg.save_every = 4, False, False, 1000
    cfg.optim.warmup_steps, cfg.ema_decay = 2, 0.5
    return apply_overrides(cfg, [f"{k}={v!r}" for k, v in overrides.items()])


def test_objective_is_global_per_token_mean():
    """Micro-batch shares sum to the per-token mean of the whole batch, with the world-size factor."""
    parts = [LossTerms(torch.tensor(6.0), torch.tensor(3.0), torch.tensor(2.0), torch.tensor(4.0)),
             LossTerms(torch.tensor(4.0), torch.tensor(2.0), torch.tensor(1.0), torch.tensor(1.0))]
    counts = torch.tensor([5.0, 5.0])
    w = LossWeights(ce=0.5, mse=2.0)
    total = sum(objective(p, counts, w, world_size=1) for p in parts)
    assert torch.isclose(total, torch.tensor(0.5 * 10 / 5 + 2.0 * 3 / 5))
    assert torch.isclose(objective(parts[0], counts, w, world_size=4), 4 * objective(parts[0], counts, w, 1))


def params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_resume_is_exact(tmp_path, tokenizer_dir):
    cfg = small(tokenizer_dir)
    straight = Trainer(cfg, tmp_path / "a")
    losses = [straight.train_step().loss for _ in range(4)]

    first = Trainer(cfg, tmp_path / "b")
    first.train_step(), first.train_step()
    first.save()
    del first
    resumed = Trainer(cfg, tmp_path / "b", resume=True)
    assert resumed.step == 2
    assert [resumed.train_step().loss for _ in range(2)] == losses[2:]
    a, b = params(straight), params(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(torch.equal(straight.ema.shadow[n], resumed.ema.shadow[n]) for n in straight.ema.shadow)
    assert losses[-1] < losses[0]


def test_crash_mid_save_keeps_last_good(tmp_path, tokenizer_dir, monkeypatch):
    cfg = small(tokenizer_dir)
    t = Trainer(cfg, tmp_path)
    t.train_step()
    good = t.save()
    t.train_step()

    def crash(state, checkpoint_id):  # half a shard on disk, then the process "dies"
        Path(checkpoint_id).mkdir(parents=True)
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"\x00" * 100)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpointing.dcp, "save", crash)
    with pytest.raises(OSError, match="simulated"):
        t.save()
    monkeypatch.undo()
    assert any(p.name.startswith(checkpointing.TMP_PREFIX) for p in t.ckpt_root.iterdir())
    assert checkpointing.latest_checkpoint(t.ckpt_root) == good
    again = Trainer(cfg, tmp_path, resume=True)
    assert again.step == 1
    again.train_step()
    again.save()  # a later save clears the debris
    assert not any(p.name.startswith(checkpointing.TMP_PREFIX) for p in t.ckpt_root.iterdir())


def test_export_then_load(tmp_path, tokenizer_dir):
    t = Trainer(small(tokenizer_dir, freeze_vit=True), tmp_path)
    t.train_step(), t.train_step()
    loaded = load_checkpoint(t.export(tmp_path / "export"))
    state = loaded.model.state_dict()
    for name, p in t.model.named_parameters():
        expected = t.ema.shadow.get(name, p)  # frozen weights are exported as they are
        assert torch.equal(state[name], expected.detach()), name
    assert not torch.equal(t.ema.shadow["llm2vae.weight"], params(t)["llm2vae.weight"])
    assert len(loaded.tokenizer) == len(t.tokenizer)


def test_init_from_with_reinit_keeps_the_rest(tmp_path, tokenizer_dir):
    """reinit gives the named parts a fresh init and loads everything else from init_from as it was."""
    t = Trainer(small(tokenizer_dir), tmp_path / "a")
    t.train_step()
    source = load_checkpoint(t.export(tmp_path / "export")).model.state_dict()
    cfg = small(tokenizer_dir, init_from=str(tmp_path / "export"), reinit=("vit_model.", "connector."),
                freeze_vit=True)
    tuned = Trainer(cfg, tmp_path / "b").model.state_dict()
    changed = {name.split(".")[0] for name in source if not torch.equal(source[name], tuned[name])}
    assert changed == {"vit_model", "connector"}
    with pytest.raises(ValueError, match="prefixes look like"):
        Trainer(small(tokenizer_dir, init_from=str(tmp_path / "export"), reinit=("vit.",)), tmp_path / "c")
    with pytest.raises(ValueError, match="set init_from too"):
        small(tokenizer_dir, reinit=("vit_model.",))


def test_a_run_without_a_tokenizer_trains_bpe_on_its_data(tmp_path, tokenizer_dir):
    """The trainer's own tokenizer learns merges from the data's texts (a bug once fed it no text, which
    left a character-level vocabulary: 'red' was three tokens)."""
    t = Trainer(small(tokenizer_dir, tokenizer=None), tmp_path)
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    for word in ("red", "green", "left", "right"):
        assert len(t.tokenizer.encode(word)) < len(word), word


def test_position_table_scale_centres_the_tables_on_the_used_grid_and_survives_export(tmp_path, tokenizer_dir):
    """The option replaces both frozen sin-cos tables by their centred, scaled versions; the checkpoint carries
    them, and a fine-tune of that checkpoint with the same option gets the same tables (not scaled twice)."""
    t = Trainer(small(tokenizer_dir, position_table_scale=40.0), tmp_path / "a")
    m, cfg = t.model, t.model_cfg
    plain = sincos_2d_table(cfg.llm.hidden_size, cfg.vit_max_num_patch_per_side)
    p = cfg.vit.patch_size
    vit_w, vit_h = target_size(*cfg.default_image_size[::-1], cfg.vit_transform)
    used = m.vit_grid_ids(vit_h // p, vit_w // p)
    table = m.vit_pos_embed.pos_embed.detach()
    assert table[used].mean(0).abs().max() < 1e-3  # the shared part is gone
    assert torch.allclose(table[used[1]] - table[used[0]], 40 * (plain[used[1]] - plain[used[0]]), atol=1e-3)
    down = cfg.latent_downsample
    latent_used = m.latent_grid_ids(cfg.default_image_size[0] // down, cfg.default_image_size[1] // down)
    assert m.latent_pos_embed.pos_embed.detach()[latent_used].mean(0).abs().max() < 1e-3
    t.train_step()  # frozen: the step leaves the tables alone
    assert torch.equal(m.vit_pos_embed.pos_embed.detach(), table)
    export = t.export(tmp_path / "export")
    assert torch.allclose(load_checkpoint(export).model.vit_pos_embed.pos_embed, table, rtol=1e-2, atol=1e-2)
    again = Trainer(small(tokenizer_dir, init_from=str(export), position_table_scale=40.0), tmp_path / "b")
    assert torch.allclose(again.model.vit_pos_embed.pos_embed.detach(), table)
    with pytest.raises(ValueError, match="position_table_scale must be > 0"):
        small(tokenizer_dir, position_table_scale=-1.0)
    vit_only = Trainer(small(tokenizer_dir, position_table_scale=40.0, position_tables=("vit",)), tmp_path / "c").model
    assert torch.allclose(vit_only.vit_pos_embed.pos_embed.detach(), table)
    plain_latent = Trainer(small(tokenizer_dir), tmp_path / "d").model.latent_pos_embed.pos_embed
    assert torch.equal(vit_only.latent_pos_embed.pos_embed, plain_latent)  # left as the sin-cos table
    with pytest.raises(ValueError, match="unknown position tables"):
        Trainer(small(tokenizer_dir, position_table_scale=40.0, position_tables=("latents",)), tmp_path / "e")


def test_encode_latents_batches_by_size_and_keeps_the_order(tmp_path, tokenizer_dir):
    """One VAE call per image size gives each image the latents it gets alone, in the input order."""
    t = Trainer(small(tokenizer_dir), tmp_path)
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=gen) * 2 - 1 for h, w in ((32, 32), (64, 32), (32, 32), (64, 32))]
    together = t.model.encode_latents(t.vae, images, sample=False)
    alone = torch.cat([t.model.encode_latents(t.vae, [img], sample=False) for img in images])
    assert together.shape == alone.shape
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_a_batch_moves_its_vae_images_as_one_flat_copy(tmp_path, tokenizer_dir):
    """Hundreds of small VAE images reach the GPU in one transfer (views of one flat tensor), not one each."""
    from openbagel.data.batch import _to_device_at_once

    batch = Trainer(small(tokenizer_dir), tmp_path).packer.next_batch()
    assert len(batch.vae_images) > 1
    stay = batch.to("cpu")
    assert all(a is b for a, b in zip(stay.vae_images, batch.vae_images))  # already there: no copy
    moved = _to_device_at_once(batch.vae_images, "cpu")
    assert len({m.untyped_storage().data_ptr() for m in moved}) == 1
    assert all(torch.equal(a, b) for a, b in zip(moved, batch.vae_images))
    meta = batch.to("meta").vae_images
    assert [m.shape for m in meta] == [i.shape for i in batch.vae_images] and meta[0].is_meta


@pytest.mark.slow
def test_compiled_layers_train_like_eager_ones(tmp_path, tokenizer_dir):
    """compile_layers: the decoder and ViT layers compiled in place (dynamic shapes: every packed batch has
    its own length) train to the same losses, and the parameter names (EMA, checkpoints) do not change."""
    eager = Trainer(small(tokenizer_dir), tmp_path / "eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = Trainer(small(tokenizer_dir, compile_layers=True), tmp_path / "compiled")
    assert [n for n, _ in compiled.model.named_parameters()] == [n for n, _ in eager.model.named_parameters()]
    for _ in range(3):
        a, b = eager.train_step(), compiled.train_step()
        assert b.loss == pytest.approx(a.loss, rel=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # it did compile (decoder, ViT)


def test_time_limit_stops_saves_and_exports(tmp_path, tokenizer_dir):
    """A run out of time ends at a step boundary with a checkpoint and the export, as a finished run does;
    `--resume` then carries on from that step."""
    t = Trainer(small(tokenizer_dir, steps=1000, time_limit_s=1e-9, export_ema=True), tmp_path)
    history = t.train()
    assert len(history) == 1 and t.step == 1
    assert 0 < history[0].data_seconds < history[0].seconds  # packing (in process here) is part of the step
    assert checkpointing.latest_checkpoint(t.ckpt_root).name == "step_0000001"
    assert load_checkpoint(tmp_path / "export").model is not None
    assert Trainer(small(tokenizer_dir, steps=1000), tmp_path, resume=True).step == 1
    with pytest.raises(ValueError, match="time_limit_s must be >= 0"):
        small(tokenizer_dir, time_limit_s=-1.0)


def test_data_workers_resume_exactly(tmp_path, tokenizer_dir):
    """Packing in worker processes: the run resumes on the same batches (the data position holds every
    lane's), and a checkpoint of one layout refuses to resume under the other with the fix in the message."""
    cfg = small(tokenizer_dir, data_workers=2)
    straight = Trainer(cfg, tmp_path / "a")
    losses = [straight.train_step().loss for _ in range(3)]
    first = Trainer(cfg, tmp_path / "b")
    first.train_step()
    first.save()
    resumed = Trainer(cfg, tmp_path / "b", resume=True)
    assert [resumed.train_step().loss for _ in range(2)] == losses[1:]
    for other in (0, 3):
        with pytest.raises(ValueError, match="resume with data_workers=2"):
            Trainer(small(tokenizer_dir, data_workers=other), tmp_path / "b", resume=True)
    plain = Trainer(small(tokenizer_dir), tmp_path / "c")
    plain.train_step()
    plain.save()
    with pytest.raises(ValueError, match="resume with data_workers=0"):
        Trainer(cfg, tmp_path / "c", resume=True)


def test_every_recipe_builds_a_valid_config():
    import dataclasses

    from openbagel.train.recipes import RECIPES, get_recipe

    for name in RECIPES:
        cfg = dataclasses.replace(get_recipe(name))  # runs the validation again
        assert cfg.steps > 0, name
    scratch = get_recipe("shapes-tiny-gpu-scratch")
    assert scratch.init_from is None and scratch.tokenizer is None and scratch.vae_from  # BPE trained, shipped AE
    cooldown, base = get_recipe("shapes-tiny-gpu-cooldown"), get_recipe("shapes-tiny-gpu")
    assert cooldown.optim.schedule == "cosine" and cooldown.optim.min_lr < base.optim.lr / 10
    assert cooldown.data == base.data and cooldown.packing == base.packing  # only the schedule changes
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("shapes-huge")


def test_autoencoder_outline_weights_the_pixels_where_shapes_differ():
    """The decoder polish's extra weight lands on a one-pixel band each side of an object's edge, nowhere else."""
    from openbagel.shapes.render import render
    from openbagel.shapes.scene import Obj, Scene
    from openbagel.processing import to_tensor
    from openbagel.train.autoencoder import foreground, outline

    x = to_tensor(render(Scene("white", (Obj("diamond", "red", "small", "center"),))))[None]
    fg = foreground(x)
    ring = outline(fg)
    assert set(ring.unique().tolist()) == {0.0, 1.0}
    assert ring[fg == 0].sum() > 0 and ring[fg == 1].sum() > 0  # both sides of the edge
    inner = -torch.nn.functional.max_pool2d(-fg, 5, stride=1, padding=2)  # two pixels inside the edge
    assert ring[inner == 1].sum() == 0 and ring.sum() < 0.05 * ring.numel()  # a thin band: 2% of the canvas
    assert ring[:, :, :10].sum() == 0  # the background far from the object gets no extra weight


def test_run_folder_rules_and_a_resume_with_a_new_learning_rate(tmp_path, tokenizer_dir, capsys):
    """A new run refuses a folder that holds one; --resume needs a checkpoint, says which settings changed,
    and applies a changed optim.lr from the resumed step on."""
    from openbagel.train.main import check_run_folder

    cfg, out = small(tokenizer_dir), tmp_path / "run"
    with pytest.raises(ValueError, match="--resume: no complete checkpoint under"):
        check_run_folder(cfg, out, resume=True)
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # a run that died before its first checkpoint
    check_run_folder(cfg, out, resume=False)  # starts over rather than dead-ending
    assert not (out / "metrics.jsonl").exists() and "starting over" in capsys.readouterr().err
    trainer = Trainer(cfg, out)
    trainer.train_step(), trainer.train_step()
    trainer.save()
    with pytest.raises(ValueError, match="already holds a run; continue it with --resume"):
        check_run_folder(cfg, out, resume=False)
    changed = small(tokenizer_dir, **{"optim.lr": 5e-4, "steps": 8})
    check_run_folder(changed, out, resume=True)
    assert "changed settings: optim.lr 0.001 -> 0.0005; steps 4 -> 8" in capsys.readouterr().err
    resumed = Trainer(changed, out, resume=True)
    assert resumed.train_step().lr == pytest.approx(5e-4 * 1.0)  # past the 2 warm-up steps: the new base LR


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1", "lr, eps and grad_clip must be > 0"),
    ("log_every=0", "log_every must be >= 1"),
    ("keep_checkpoints=0", "keep_checkpoints must be >= 1"),
    ("packing.rows_per_batch=0", "rows_per_batch must be >= 1"),
    ("data.image_size=0", "data.image_size must be a multiple of 16"),
])
def test_invalid_values_are_refused_when_set(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(tiny(), [override])


def test_resume_on_another_number_of_processes_is_refused(tmp_path, tokenizer_dir):
    from openbagel.train.parallel import World

    trainer = Trainer(small(tokenizer_dir), tmp_path / "run")
    trainer.train_step()
    path = trainer.save()
    two = World(0, 2, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"written by 1 process\(es\) and this run has 2: resume it with the same"):
        checkpointing.load_training_checkpoint(path, two, trainer.model, trainer.optimizer, trainer.ema)


def test_a_parquet_file_without_the_columns_names_them(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from openbagel.data.sources import ParquetSource, t2i_sample

    pq.write_table(pa.table({"caption": ["a red circle"], "img": [b"x"]}), tmp_path / "t.parquet")
    source = ParquetSource([str(tmp_path / "t.parquet")], 0, t2i_sample)
    with pytest.raises(ValueError, match=r"t.parquet has no column 'captions'; its columns: \['caption', 'img'\]"):
        next(source(0, 1))


@pytest.mark.slow
def test_shapes_tiny_recipe_runs_every_stage_from_scratch(tmp_path, monkeypatch, capsys):
    """`openbagel train shapes-tiny` on a clean checkout: tokenizer, autoencoder (+ decoder polish), unified
    model and export, in one run folder (stage lengths cut down; the recipe's own are hours)."""
    import json
    from dataclasses import replace

    from openbagel import cli
    from openbagel.inference.pipeline import BagelPipeline
    from openbagel.train import embedded

    quick = replace(embedded.AUTOENCODERS["shapes-tiny"], steps=3, batch_size=2, save_every=1000, log_every=1,
                    polish_steps=2)
    monkeypatch.setitem(embedded.AUTOENCODERS, "shapes-tiny", quick)
    out = tmp_path / "run"
    assert cli.main(["train", "shapes-tiny", "steps=2", "save_every=2", "eval_every=0", "--out", str(out)]) == 0
    assert "step 2: loss" in capsys.readouterr().out
    metrics = json.loads((out / "autoencoder" / "ae_metrics.json").read_text())
    assert metrics["polished_steps"] == 2
    vocab = json.loads((out / "export" / "tokenizer.json").read_text())["model"]
    assert vocab["merges"], "the tokenizer stage trained no BPE merges"
    pipe = BagelPipeline.from_pretrained(out / "export", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    image = pipe.generate("a large red circle at the center on a black background", num_inference_steps=2).images[0]
    assert image.size == (64, 64)
