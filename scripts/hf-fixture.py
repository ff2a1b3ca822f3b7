#!/usr/bin/env python3
"""Reference numbers for the trainer from Hugging Face transformers, which nobody here wrote.

Builds a tiny random BertForMaskedLM (fixed seed, tanh GELU, no dropout, every parameter
random so none is trivially zero or one), and writes to trainer/tests/fixtures/hf-bert-tiny/:

  config.json, model.safetensors  as save_pretrained writes them (the importer reads these)
  fixture.json                    one batch (input ids, token types, masked positions and
                                  targets), and in f32 and f64: the mean loss over the masked
                                  positions and each position's loss
  grads-f32.safetensors           the gradient of the mean loss for every tensor of
  grads-f64.safetensors           model.safetensors, computed in f32 / in f64 (the same f32
                                  weights widened)

trainer/tests/trainer_hf_fixture.rs loads the weights through hetccl_trainer::hf, runs the
trainer's forward and backward on the batch, and matches these numbers. CI runs only that.

Regenerate (needs torch and transformers; any recent CPU build of torch):

    python3 -m venv /tmp/hf-venv && /tmp/hf-venv/bin/pip install torch transformers safetensors
    /tmp/hf-venv/bin/python scripts/hf-fixture.py

Second mode, the other direction: check that transformers loads a directory the trainer
exported (hetccl-bert export --hf DIR) with no missing or unexpected keys, and print the
loss and per-position losses it computes on the fixture's batch, to set beside the trainer's
on the same weights (trainer_hf_fixture.rs prints them, and writes such a directory):

    /tmp/hf-venv/bin/python scripts/hf-fixture.py --check DIR
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForMaskedLM

SEED = 1234
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "trainer", "tests",
                   "fixtures", "hf-bert-tiny")

# Smaller than the trainer's bert-tiny preset (the fixture stays a few tens of kB) but with
# every part: two layers, two heads, two token types, a vocabulary wider than the hidden size.
CONFIG = dict(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
    type_vocab_size=2,
    hidden_act="gelu_pytorch_tanh",
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    layer_norm_eps=1e-12,
    tie_word_embeddings=True,
)
BATCH, SEQ = 2, 10


def build():
    torch.manual_seed(SEED)
    config = BertConfig(**CONFIG)
    model = BertForMaskedLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                # wider than BERT's 0.02, so the softmax is not flat and every path matters
                p.copy_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=g)
    types = torch.randint(0, 2, (BATCH, SEQ), generator=g)
    # three masked positions per sequence, flat index b*T + t ascending
    positions = sorted(b * SEQ + t for b in range(BATCH)
                       for t in torch.randperm(SEQ, generator=g)[:3].tolist())
    targets = torch.randint(0, CONFIG["vocab_size"], (len(positions),), generator=g)
    batch = dict(batch=BATCH, seq_len=SEQ, input_ids=ids.flatten().tolist(),
                 token_types=types.flatten().tolist(), masked_positions=positions,
                 masked_targets=targets.tolist())
    return model, batch


def run(model, batch, dtype):
    """Mean loss, per-position losses and the gradient of every named parameter."""
    model = model.to(dtype)
    model.zero_grad()
    ids = torch.tensor(batch["input_ids"]).view(batch["batch"], batch["seq_len"])
    types = torch.tensor(batch["token_types"]).view_as(ids)
    labels = torch.full((ids.numel(),), -100)
    labels[batch["masked_positions"]] = torch.tensor(batch["masked_targets"])
    out = model(input_ids=ids, token_type_ids=types, attention_mask=torch.ones_like(ids),
                labels=labels.view_as(ids))
    out.loss.backward()
    logits = out.logits.view(-1, CONFIG["vocab_size"])[batch["masked_positions"]]
    per_pos = torch.nn.functional.cross_entropy(
        logits.detach(), torch.tensor(batch["masked_targets"]), reduction="none")
    return out.loss.item(), per_pos.tolist(), model


def generate():
    model, batch = build()
    os.makedirs(OUT, exist_ok=True)
    model.save_pretrained(OUT, safe_serialization=True)
    names = sorted(load_file(os.path.join(OUT, "model.safetensors")).keys())
    fixture = dict(seed=SEED, batch=batch)
    for dtype, tag in [(torch.float32, "f32"), (torch.float64, "f64")]:
        loss, per_pos, m = run(model, batch, dtype)
        fixture[tag] = dict(loss=loss, losses=per_pos)
        grads = {n: m.get_parameter(n).grad.detach().clone().contiguous() for n in names}
        save_file(grads, os.path.join(OUT, f"grads-{tag}.safetensors"))
        print(f"{tag}: loss {loss!r}")
    with open(os.path.join(OUT, "fixture.json"), "w") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")
    print("wrote", os.path.normpath(OUT))


def check(directory):
    with open(os.path.join(OUT, "fixture.json")) as f:
        fixture = json.load(f)
    model, info = BertForMaskedLM.from_pretrained(directory, output_loading_info=True)
    bad = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    print("loading info:", {k: sorted(v) for k, v in info.items()})
    if bad or info.get("error_msgs"):
        sys.exit(f"{directory}: not loaded cleanly: {bad} {info.get('error_msgs')}")
    print("hidden_act:", model.config.hidden_act)
    for dtype, tag in [(torch.float32, "f32"), (torch.float64, "f64")]:
        loss, per_pos, _ = run(model.eval(), fixture["batch"], dtype)
        print(f"{tag}: loss {loss!r} (fixture {fixture[tag]['loss']!r}); per position "
              + " ".join(f"{x:.17g}" for x in per_pos))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", metavar="DIR",
                    help="load an exported directory with transformers instead")
    a = ap.parse_args()
    if a.check:
        check(a.check)
    else:
        generate()
