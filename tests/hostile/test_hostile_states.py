"""State files and the HybridLM API under hostile and mistaken input: one-line ValueErrors that name the
tensor, field or argument, never a KeyError / IndexError / AttributeError from deep inside a layer."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hostile_helpers import lightning_ckpt, tiny_model

from nestlm.models import HybridConfig, HybridLM, State
from nestlm.models.loading import CheckpointError, read_checkpoint
from nestlm.train.module import LitHybridLM

SMALL = dict(vocab_size=61, d_model=32, n_heads=2, window=5, ssm_headdim=16, ssm_d_state=8, ssm_chunk_size=8)
MEM = dict(mem_heads=2, mem_head_dim=8, mem_chunk_size=4, hope_chunk_size=3, cms_periods=[None, 3])


def model(layers, **kw) -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(HybridConfig(**{**SMALL, **MEM, "layers": layers, **kw})).eval()


def state_of(m: HybridLM, batch: int = 2, t: int = 5) -> State:
    with torch.no_grad():
        return m(torch.randint(0, 61, (batch, t))).state


def header_and_data(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return raw, n


def rewrite_header(path, edit):
    """Edit the JSON header of a safetensors file (the tensors stay as they are)."""
    raw, n = header_and_data(path)
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def test_nan_state_and_corrupted_bytes_are_refused(tmp_path):
    m = model(["swa", "hope"], channel_mixers=["mlp", "cms"])
    s = state_of(m)
    s.save(tmp_path / "ok.safetensors")
    assert State.load(tmp_path / "ok.safetensors").flat().keys() == s.flat().keys()

    bad = s.clone()
    bad.blocks[1]["mixer"]["mem_W"][0, 0, 0, 0] = float("nan")
    bad.save(tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match="blocks.1.mixer.mem_W holds 1 non-finite"):
        State.load(tmp_path / "nan.safetensors")

    raw, n = header_and_data(tmp_path / "ok.safetensors")
    flipped = bytearray(raw)
    flipped[8 + n + 100] ^= 0x10  # one bit of one tensor, still a finite number
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum"):
        State.load(tmp_path / "flip.safetensors")


def test_state_headers_that_lie(tmp_path):
    m = model(["swa", "mamba"])
    state_of(m).save(tmp_path / "s.safetensors")

    def state_meta(edit):
        def go(h):
            d = json.loads(h["__metadata__"]["nestlm_state"])
            edit(d)
            h["__metadata__"]["nestlm_state"] = json.dumps(d)

        return go

    cases = [
        (state_meta(lambda d: d.update(format=99)), "unknown state format 99"),
        (state_meta(lambda d: d.pop("format")), "no format version"),
        (state_meta(lambda d: d["layout"][0].update(mixer=["k", "v"])), "do not match the layout"),
        (state_meta(lambda d: d["meta"].update(tokens_seen="many")), "tokens_seen"),
        (lambda h: h["__metadata__"].update(nestlm_state="{not json"), "damaged state header"),
    ]
    for i, (edit, needle) in enumerate(cases):
        f = tmp_path / f"c{i}.safetensors"
        f.write_bytes((tmp_path / "s.safetensors").read_bytes())
        rewrite_header(f, edit)
        with pytest.raises(ValueError, match=needle) as e:
            State.load(f)
        assert "\n" not in str(e.value)


def test_forged_or_missing_config_hash_is_caught_by_the_model(tmp_path):
    a, b = model(["swa", "mamba"]), model(["mamba", "swa"])
    f = tmp_path / "s.safetensors"
    for forged in (b._config_hash, None):
        state_of(a).save(f)
        rewrite_header(
            f,
            lambda h, forged=forged: h["__metadata__"].update(
                nestlm_state=json.dumps(
                    {**json.loads(h["__metadata__"]["nestlm_state"]), "meta": {"config_hash": forged, "tokens_seen": 5}}
                )
            ),
        )
        with pytest.raises(ValueError, match="blocks.0.mixer holds") as e:
            b(torch.randint(0, 61, (2, 3)), State.load(f))
        assert "\n" not in str(e.value)


def test_state_save_onto_a_folder_leaves_nothing(tmp_path):
    s = state_of(model(["swa", "hope"], channel_mixers=["mlp", "cms"]))
    (tmp_path / "dir").mkdir()
    with pytest.raises(IsADirectoryError, match="dir"):
        s.save(tmp_path / "dir")
    assert list(tmp_path.rglob("*")) == [tmp_path / "dir"]


@pytest.mark.parametrize("layers", [["attn"], ["swa"], ["hope"], ["mamba"], ["memory"]])
def test_state_of_another_batch_size(layers):
    m = model(layers)
    with pytest.raises(ValueError, match="batch of 3 rows but input_ids has 2") as e:
        m(torch.randint(0, 61, (2, 4)), state_of(m, batch=3))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("layers", [["mamba"], ["mamba2"], ["memory"], ["hope"], ["attn"]])
def test_empty_inputs(layers):
    m = model(layers)
    s = state_of(m, batch=2, t=3)
    with torch.no_grad():
        out = m(torch.zeros(2, 0, dtype=torch.long), s)  # an empty piece of a stream
    assert out.logits.shape == (2, 0, 61) and out.state.tokens_seen == s.tokens_seen
    assert all(torch.equal(out.state.flat()[k], v) for k, v in s.flat().items())
    with pytest.raises(ValueError, match="no rows"):
        m(torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="T >= 1"):
        m.generate(torch.zeros(1, 0, dtype=torch.long), 3)


def test_wrong_argument_types_and_ids():
    m = model(["swa"])
    for bad, needle in (
        ([[1, 2, 3]], "got list"),
        (torch.rand(1, 3), "integer tensor"),
        (torch.ones(3).long(), "(3,)"),
    ):
        with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            m(bad)
    with pytest.raises(ValueError, match="must be a nestlm.models.State or None, got dict"):
        m(torch.ones(1, 3, dtype=torch.long), state={})
    for ids, token in ((torch.tensor([[1, 61]]), "61"), (torch.tensor([[-1, 2]]), "-1")):
        with pytest.raises(ValueError, match=f"token id {token}, outside the vocabulary"):
            m(ids)


def test_carried_training_state_round_trips_and_is_validated(tmp_path):
    module = LitHybridLM(preset="transformer", overrides={**SMALL, "layers": ["swa", "mamba"]})
    module._carry = module(torch.randint(0, 61, (2, 7))).state.detach()
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    again = LitHybridLM(preset="transformer", overrides={**SMALL, "layers": ["swa", "mamba"]})
    again.on_load_checkpoint(ckpt)
    assert all(torch.equal(v, again._carry.flat()[k]) for k, v in module._carry.flat().items())
    # a carry written before the state format was recorded still resumes
    old = {k: v for k, v in ckpt["nestlm_carry_state"].items() if k not in ("format", "checksum")}
    again.on_load_checkpoint({**ckpt, "nestlm_carry_state": old})
    assert again._carry.flat().keys() == module._carry.flat().keys()
    # a non-finite carried state makes the checkpoint unusable for resume
    ckpt["nestlm_carry_state"]["tensors"]["blocks.1.mixer.ssm"].fill_(float("inf"))
    ckpt["nestlm_carry_state"].pop("checksum")
    path = tmp_path / "c.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="nestlm_carry_state: state tensor blocks.1.mixer.ssm"):
        read_checkpoint(path)


def test_checkpoint_loader_rejects_non_tensor_weights(tmp_path):
    ckpt = lightning_ckpt(tmp_path / "w.ckpt", tiny_model())
    d = torch.load(ckpt, weights_only=True)
    d["state_dict"]["model.embed.weight"] = [1.0, 2.0]
    torch.save(d, ckpt)
    with pytest.raises(CheckpointError, match="not tensors"):
        read_checkpoint(ckpt)
