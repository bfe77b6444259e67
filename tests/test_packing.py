"""Packing: layout, RoPE ids, labels, timesteps, masks against a brute-force reference, budgets, resume."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from openbagel.config import preset
from openbagel.data.batch import PAD, TEXT, VAE, VIT
from openbagel.data.interleaved import ImageItem, TextItem
from openbagel.data.packing import CAUSAL, FULL, NOISE, Packer, PackingConfig, collate, tokenize
from openbagel.data.sources import synthetic_source
from openbagel.tokenizer import train_tokenizer

CFG = preset("tiny")
NO_DROP = PackingConfig(expected_num_tokens=64, max_num_tokens=512, max_num_tokens_per_sample=512,
                        text_cond_dropout_prob=0, vae_cond_dropout_prob=0, vit_cond_dropout_prob=0)
WORDS = ["red", "green", "blue", "left", "right", "top", "bottom", "what", "colour", "where"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([" ".join(p) for p in itertools.permutations(WORDS[:5], 3)] + WORDS, 300)


def img(side: int = 32) -> Image.Image:
    return Image.new("RGB", (side, side), (200, 30, 30))


def test_layout_rope_labels_timesteps(tok):
    text = tok.encode("red left")
    n = len(text) + 2
    s = tokenize([TextItem("red left"), ImageItem(img(), loss=True, vae=True, vit=True),
                  TextItem("blue", loss=True)], 0, tok, CFG, NO_DROP, seed=0)
    lat, vit = (32 // 16) ** 2, (32 // 8) ** 2  # 2x2 latent tokens, 4x4 ViT patches
    # Splits: text (causal), noisy VAE, clean VAE, ViT (all with vision brackets), text.
    sizes = [n, lat + 2, lat + 2, vit + 2, len(tok.encode("blue")) + 2]
    assert s.num_tokens == sum(sizes)
    assert s.split == [i for i, k in enumerate(sizes) for _ in range(k)]
    assert [s.mode[sum(sizes[:i])] for i in range(5)] == [CAUSAL, NOISE, FULL, FULL, CAUSAL]
    # RoPE: text 0..n-1; noisy at n (no advance); clean copy also n (+1); ViT n+1 (+1); text from n+2.
    pos = s.position_ids
    assert pos[:n] == list(range(n))
    assert set(pos[n:n + 2 * (lat + 2)]) == {n}
    assert set(pos[n + 2 * (lat + 2):n + 2 * (lat + 2) + vit + 2]) == {n + 1}
    assert pos[-sizes[-1]:] == list(range(n + 2, n + 2 + sizes[-1]))
    # Kinds: brackets are text tokens around the image tokens.
    assert s.kind[n:n + lat + 2] == [TEXT] + [VAE] * lat + [TEXT]
    assert s.text_ids[n] == tok.start_of_image_id and s.text_ids[n + lat + 1] == tok.end_of_image_id
    assert VIT in s.kind
    # Labels: only the loss text, shifted: <|im_start|> blue -> blue <|im_end|>, last position nothing.
    blue = tok.encode("blue")
    assert s.labels[-sizes[-1]:] == [*blue, tok.eos_id, -100]
    assert set(s.labels[:-sizes[-1]]) == {-100}
    # One logit-normal draw for the noisy image, -inf for its clean copy.
    noisy, clean = s.timesteps_raw
    assert torch.isfinite(noisy).all() and len(set(noisy.tolist())) == 1 and torch.isneginf(clean).all()
    b = collate([[s]], NO_DROP)
    assert b.mse_mask.tolist() == [True] * lat + [False] * lat
    assert b.latent_position_ids.tolist() == [0, 1, CFG.max_latent_size, CFG.max_latent_size + 1] * 2
    assert b.vit_position_ids[:5].tolist() == [0, 1, 2, 3, CFG.vit_max_num_patch_per_side]
    assert len(b.vae_images) == 2 and b.vit_seqlens == [vit]


def test_cfg_dropout_keeps_rope_for_images_skips_text(tok):
    drop_all = PackingConfig(expected_num_tokens=64, max_num_tokens=512, max_num_tokens_per_sample=512,
                             text_cond_dropout_prob=1, vae_cond_dropout_prob=1, vit_cond_dropout_prob=1)
    sample = [ImageItem(img()), TextItem("red left"), TextItem("blue", loss=True),
              ImageItem(img(), loss=True, vae=False, vit=False)]
    s = tokenize(sample, 0, tok, CFG, drop_all, seed=0)
    # Both context copies dropped but take positions 0 and 1; the context text is dropped (no position);
    # the loss text is kept from 2; the target is the last split.
    n = len(tok.encode("blue")) + 2
    assert s.position_ids[:n] == list(range(2, 2 + n))
    assert s.mode[-1] == NOISE and set(s.position_ids[n:]) == {2 + n}
    # Nothing is dropped in a sample without a generation target.
    und = [ImageItem(img(), vae=False), TextItem("what colour")]
    assert VIT in tokenize(und, 0, tok, CFG, drop_all, seed=0).kind


def brute_force_mask(rows) -> torch.Tensor:
    """The rules of reference 2.3 token by token: same sample, and (key not after query or same
    non-causal split), and never into another split's noisy image; padding sees only itself."""
    L = max(sum(s.num_tokens for s in row) for row in rows)
    out = []
    for row in rows:
        meta = [(d, sp, m) for d, s in enumerate(row) for sp, m in zip(s.split, s.mode)]
        m = torch.zeros(L, L, dtype=torch.bool)
        for q in range(L):
            for k in range(L):
                if q >= len(meta) or k >= len(meta):
                    m[q, k] = q == k and q >= len(meta)
                    continue
                (dq, sq, mq), (dk, sk, mk) = meta[q], meta[k]
                same_split = dq == dk and sq == sk
                ok = dq == dk and (k <= q or (same_split and mq != CAUSAL))
                m[q, k] = ok and not (mk == NOISE and not same_split)
        out.append(m)
    return torch.stack(out)


item = st.one_of(
    st.builds(lambda w, loss: TextItem(" ".join(w), loss), st.lists(st.sampled_from(WORDS), max_size=4), st.booleans()),
    st.builds(lambda side, loss, vae, vit: ImageItem(img(side), loss, vae, vit or not (loss or vae)),
              st.sampled_from([16, 32]), st.booleans(), st.booleans(), st.booleans()),
)


@settings(max_examples=25, deadline=None)
@given(samples=st.lists(st.lists(item, min_size=1, max_size=4), min_size=1, max_size=4),
       drop=st.sampled_from([0.0, 0.5]), rows=st.integers(1, 2))
def test_mask_matches_brute_force(tok, samples, drop, rows):
    cfg = PackingConfig(expected_num_tokens=64, max_num_tokens=512, max_num_tokens_per_sample=512, pad_to_multiple=8,
                        text_cond_dropout_prob=drop, vae_cond_dropout_prob=drop, vit_cond_dropout_prob=drop)
    toks = [tokenize(s, i, tok, CFG, cfg, seed=1) for i, s in enumerate(samples)]
    packed = [toks[r::rows] for r in range(rows) if toks[r::rows]]
    batch = collate(packed, cfg)
    L = batch.attn_mask.shape[-1]
    ref = brute_force_mask(packed)
    ref = torch.nn.functional.pad(ref, (0, L - ref.shape[-1], 0, L - ref.shape[-1]))
    for r in range(len(packed)):  # padding beyond the brute-force length: self only
        n = sum(s.num_tokens for s in packed[r])
        ref[r, range(n, L), range(n, L)] = True
    assert torch.equal(batch.attn_mask[:, 0], ref)
    assert batch.attn_mask.any(-1).all(), "every query row must see at least one key"
    # Image data lines up with the token grid in row-major order.
    assert (batch.token_kind == VIT).sum() == batch.vit_patches.shape[0] == sum(batch.vit_seqlens)
    assert (batch.token_kind == VAE).sum() == batch.latent_position_ids.shape[0] == batch.timesteps_raw.shape[0]
    assert batch.num_tokens == sum(s.num_tokens for s in toks)


def test_packer_budget_and_resume(tok):
    cfg = PackingConfig(expected_num_tokens=100, max_num_tokens=128, max_num_tokens_per_sample=120, rows_per_batch=2)
    source = synthetic_source(seed=3, image_size=32)
    a = Packer(source, tok, CFG, cfg, seed=5)
    batches = [a.next_batch() for _ in range(3)]
    for b in batches:
        assert b.token_kind.shape[0] == 2
        assert ((b.token_kind != PAD).sum(1) <= cfg.max_num_tokens).all()
    state = a.state()
    following = [a.next_batch() for _ in range(2)]
    b = Packer(source, tok, CFG, cfg, seed=5)
    b.load_state(state)
    for x, y in zip(following, [b.next_batch() for _ in range(2)]):
        assert x.sample_ids == y.sample_ids
        assert torch.equal(x.attn_mask, y.attn_mask) and torch.equal(x.timesteps_raw, y.timesteps_raw)
    # Rank sharding: rank r of 2 reads indices r, r+2, ...
    r1 = Packer(source, tok, CFG, cfg, seed=5, rank=1, world_size=2).next_batch()
    assert all(i % 2 == 1 for i in r1.sample_ids)


def test_batch_tokens_budget(tok):
    cfg = PackingConfig(expected_num_tokens=60, max_num_tokens=128, max_num_tokens_per_sample=120, batch_tokens=200)
    b = Packer(synthetic_source(seed=3, image_size=32), tok, CFG, cfg, seed=5).next_batch()
    assert b.num_tokens >= 200 and b.num_tokens - (b.token_kind[-1] != PAD).sum() < 200


# ----- file sources -------------------------------------------------------------------------------


def png(colour) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_parquet_and_jsonl_sources(tmp_path, tok):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from openbagel.data.sources import DataConfig, build_source

    pq.write_table(pa.table({"image": [png("red"), png("blue")],
                             "captions": [json.dumps({"short": "red", "long": "all red"}), json.dumps(["blue"])]}),
                   tmp_path / "t2i.parquet", row_group_size=1)
    t2i = build_source(DataConfig(kind="t2i_parquet", paths=[str(tmp_path / "t2i.parquet")]), seed=0)
    got = list(itertools.islice(t2i(0, 1), 4))
    assert [i for i, _ in got] == [0, 1, 2, 3]  # endless: epoch 2 follows epoch 1
    for _, sample in got:
        assert isinstance(sample[0], TextItem) and sample[0].text in ("red", "all red", "blue")
        assert sample[1].loss and not sample[1].vae and not sample[1].vit
    assert next(iter(t2i(1, 2)))[1][0].text == got[1][1][0].text  # random access = replay

    pq.write_table(pa.table({"image_list": [[png("red"), png("green"), png("blue")]],
                             "instruction_list": [[["make it green", "make it green now"], ["make it blue"]]]}), tmp_path / "edit.parquet")
    edit = build_source(DataConfig(kind="edit_parquet", paths=[str(tmp_path / "edit.parquet")]), seed=0)
    for _, sample in itertools.islice(edit(0, 1), 6):
        assert isinstance(sample[0], ImageItem) and not sample[0].loss and sample[0].vae and sample[0].vit
        assert sample[-1].loss and not sample[-1].vae  # the final target: noisy only
        assert all(isinstance(x, TextItem) and x.text.startswith("make it") for x in sample[1::2])
        tokenize(sample, 0, tok, CFG, NO_DROP, seed=0)

    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    record = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat colour"},
                                                  {"from": "gpt", "value": "red"}]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(record) + "\n")
    llava = build_source(DataConfig(kind="llava_jsonl", paths=[str(tmp_path / "chat.jsonl")], image_dir=str(tmp_path)), 0)
    (_, sample), = itertools.islice(llava(0, 1), 1)
    assert [type(x).__name__ for x in sample] == ["ImageItem", "TextItem", "TextItem"]
    assert sample[0].vit and not sample[0].vae and not sample[1].loss and sample[2].loss and sample[2].text == "red"


def test_worker_packer_delivers_the_packers_batches_intact(tok):
    """One worker lane is the one-process stream: every tensor and every VAE image arrives unchanged
    (the images cross the process boundary flattened into one tensor)."""
    from dataclasses import fields

    from openbagel.data.sources import DataConfig
    from openbagel.data.workers import WorkerPacker

    cfg = PackingConfig(expected_num_tokens=100, max_num_tokens=128, max_num_tokens_per_sample=120, rows_per_batch=2)
    data = DataConfig(kind="synthetic", image_size=32)
    local = Packer(synthetic_source(seed=3, image_size=32), tok, CFG, cfg, seed=3)
    remote = WorkerPacker(data, tok, CFG, cfg, seed=3, workers=1)
    for _ in range(3):
        a, b = local.next_batch(), remote.next_batch()
        assert a.vae_images and len(a.vae_images) == len(b.vae_images)
        assert all(torch.equal(x, y) for x, y in zip(a.vae_images, b.vae_images))
        for f in fields(a):
            x, y = getattr(a, f.name), getattr(b, f.name)
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), f.name
            elif f.name != "vae_images":
                assert x == y, f.name
    assert remote.state()["lanes"][0] == local.state()
