"""``make-tiny --trained``'s pieces without the full run: the fixed split of
the stdlib corpus (held-out files never trained on), held-out prompts drawn
from held-out files only, and a short training run that is bit-identical
when repeated (seeded, deterministic algorithms, fixed threads)."""

from __future__ import annotations

import torch

from vllm_mixed.tiny import TINY_CONFIG, train_tokenizer
from vllm_mixed.training import TrainSettings, corpus_files, heldout_prompts, read_text, split_files, train_master


def test_split_is_fixed_and_disjoint():
    files = corpus_files()
    assert files == sorted(files, key=lambda p: p.name.encode())
    train, held = split_files(files)
    assert held and train and not set(train) & set(held) and len(train) + len(held) == len(files)
    assert held == [files[i] for i in range(5, len(files), 10)]
    prompts = heldout_prompts(held)
    assert len(prompts) == len(set(prompts)) == 48
    held_text, train_text = read_text(held), read_text(train)
    assert all(p in held_text for p in prompts)
    assert not [p for p in prompts if p in train_text]


def test_training_is_deterministic():
    text = read_text(split_files(corpus_files())[0][:3])
    tok = train_tokenizer([text])
    ids = tok.encode(text).ids[:4000]
    settings = TrainSettings(steps=3, batch=2, seq_len=32)
    a = train_master(dict(TINY_CONFIG), ids, settings)
    b = train_master(dict(TINY_CONFIG), ids, settings)
    assert a.losses == b.losses and a.losses[-1] < a.losses[0]
    assert a.master.keys() == b.master.keys()
    assert all(torch.equal(a.master[k], b.master[k]) for k in a.master)
    experts = [k for k in a.master if ".mlp.experts." in k]
    assert len(experts) == 2 * 8 * 3 and a.master[experts[0]].shape == (256, 256)
