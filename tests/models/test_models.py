"""HybridLM contracts on CPU: streaming == one call, causality, batch independence, persistence."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml
from pieces import random_pieces
from small_configs import SMALL

from nestlm.models import HybridConfig, HybridLM, State, next_token_loss
from nestlm.models.presets import PRESETS, SIZES, main, preset_files

STACKS = {
    "attn": ["attn", "attn"],
    "swa": ["swa", "swa"],
    "mamba": ["mamba"],
    "mamba2": ["mamba2"],
    "memory": ["memory"],
    "hope": ["hope"],
    "attn+swa": ["swa", "attn", "swa"],
    "mixed": ["mamba2", "swa", "hope", "mamba", "memory", "attn"],
}
CMS_STACKS = {"mixed", "hope"}  # these run with CMS channel mixers


def small_model(layers, **kw) -> HybridLM:
    torch.manual_seed(0)
    if kw.pop("cms", False):
        kw["channel_mixers"] = ["cms" if i % 2 else "mlp" for i in range(len(layers))] if len(layers) > 1 else ["cms"]
    return HybridLM(HybridConfig(**{**SMALL, "layers": layers, **kw})).double().eval()


@pytest.mark.parametrize("stack", list(STACKS))
def test_streaming_equals_one_call(stack):
    model = small_model(STACKS[stack], cms=stack in CMS_STACKS)
    x = torch.randint(0, 61, (2, 53))
    with torch.no_grad():
        full = model(x)
        state, pieces = None, []
        for a, b in random_pieces(53, random.Random(1)):
            out = model(x[:, a:b], state)
            state, _ = out.state, pieces.append(out.logits)
    streamed = torch.cat(pieces, 1)
    rel = (streamed - full.logits).norm() / full.logits.norm()
    assert rel <= 1e-9, rel
    for (ka, a), (kb, b) in zip(full.state.flat().items(), state.flat().items()):
        assert ka == kb and torch.allclose(a.double(), b.double(), rtol=1e-9, atol=1e-12), ka
    assert state.tokens_seen == 53


@pytest.mark.parametrize("stack", list(STACKS))
def test_causality_and_batch_independence(stack):
    model = small_model(STACKS[stack], cms=stack in CMS_STACKS)
    x = torch.randint(0, 61, (3, 40))
    y = x.clone()
    y[1, 25] = (y[1, 25] + 1) % 61  # change one token of row 1
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    assert torch.equal(a[1, :25], b[1, :25])  # earlier positions untouched
    assert not torch.allclose(a[1, 25:], b[1, 25:])  # the change is seen
    assert torch.equal(a[[0, 2]], b[[0, 2]])  # other rows untouched


def test_sliding_window_state_is_bounded_and_local():
    model = small_model(["swa"])
    with torch.no_grad():
        s1 = model(torch.randint(0, 61, (1, 20))).state
        s2 = model(torch.randint(0, 61, (1, 300))).state
    assert s1.blocks[0]["mixer"]["k"].shape == s2.blocks[0]["mixer"]["k"].shape  # W-1 slots, not T
    # tokens older than the window cannot influence a one-layer SWA model
    x = torch.randint(0, 61, (1, 30))
    y = x.clone()
    y[0, 0] = (y[0, 0] + 1) % 61
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    assert torch.equal(a[0, 7:], b[0, 7:]) and not torch.allclose(a[0, :7], b[0, :7])


def test_generate_matches_greedy_full_forward():
    model = small_model(["swa", "attn"])
    prompt = torch.randint(0, 61, (2, 9))
    new, state = model.generate(prompt, max_new_tokens=6)
    seq = prompt
    for _ in range(6):
        with torch.no_grad():
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(new, seq[:, 9:])
    assert state.tokens_seen == 9 + 5


def test_generate_stops_prefills_in_chunks_and_continues_its_state():
    model = small_model(["mamba", "attn"])
    prompt = torch.randint(0, 61, (1, 23))
    full, _ = model.generate(prompt, max_new_tokens=8)
    chunked, state = model.generate(prompt, max_new_tokens=8, chunk_size=5)
    assert torch.equal(full, chunked)
    # stop(new) ends decoding early; the last new token is not fed to the returned state
    stop_at = int(full[0, 3])
    short, state = model.generate(prompt, 8, chunk_size=5, stop=lambda new: int(new[0, -1]) == stop_at)
    assert torch.equal(short, full[:, : short.shape[1]]) and int(short[0, -1]) == stop_at
    assert state.tokens_seen == 23 + short.shape[1] - 1
    with torch.no_grad():
        cont = model(short[:, -1:], state).logits
        ref = model(torch.cat([prompt, short], 1)).logits[:, -1:]
    torch.testing.assert_close(cont, ref, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(prompt[:, :0], 3)


@pytest.mark.parametrize("chunk_size", [1, 4, 13, None])
def test_stream_equals_one_call(chunk_size):
    model = small_model(["mamba2", "swa", "memory"], cms=True)
    x = torch.randint(0, 61, (2, 40))
    with torch.no_grad():
        full = model(x)
    outs = list(model.stream(x, chunk_size))
    assert [o.logits.shape[1] for o in outs] == (
        [40] if chunk_size is None else [min(chunk_size, 40 - s) for s in range(0, 40, chunk_size)]
    )
    torch.testing.assert_close(torch.cat([o.logits for o in outs], 1), full.logits, rtol=1e-9, atol=1e-9)
    for a, b in zip(outs[-1].state.flat().values(), full.state.flat().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    half = list(model.stream(x[:, 20:], chunk_size, state=list(model.stream(x[:, :20], 7))[-1].state))
    torch.testing.assert_close(torch.cat([o.logits for o in half], 1), full.logits[:, 20:], rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="chunk_size"):
        next(model.stream(x, 0))


def test_attention_window_bounds_full_attention_and_restores():
    model = small_model(["attn", "swa"])
    assert model.full_attention_layers() == [model.blocks[0].mixer]
    x = torch.randint(0, 61, (1, 50))
    with torch.no_grad():
        with model.attention_window(7):
            windowed = model(x)
            assert windowed.state.blocks[0]["mixer"]["k"].shape[1] == 6  # window - 1 slots, not 50
        as_swa = small_model(["swa", "swa"])  # the same weights (same seed) with a window of 7 everywhere
        assert torch.equal(windowed.logits, as_swa(x).logits)
        assert model.blocks[0].mixer.window is None and model(x).state.blocks[0]["mixer"]["k"].shape[1] == 50
        with model.attention_window(None):
            assert model.blocks[0].mixer.window is None
    for bad in (0, -1, 3.5, "8", True):
        with pytest.raises(ValueError, match="window"), model.attention_window(bad):
            pass


def test_save_load_round_trip_identical_logits(tmp_path):
    model = small_model(["swa", "attn"]).float()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["layers"] == ["swa", "attn"]
    loaded = HybridLM.from_pretrained(tmp_path)
    x = torch.randint(0, 61, (2, 17))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.embed.weight.data_ptr()  # still tied


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        tmp_path.joinpath("x").mkdir()
        HybridLM.from_pretrained(tmp_path / "x")
    small_model(["attn"]).save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["d_model"] = 64  # weights no longer match the config
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model.safetensors"):
        HybridLM.from_pretrained(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="cannot read"):
        HybridLM.from_pretrained(tmp_path / "a")


@pytest.mark.parametrize(
    "field,value,msg",
    [
        ("d_model", 0, "d_model=0"),
        ("n_heads", 5, "n_heads=5"),
        ("layers", "AXQ", "layers='AXQ'"),
        ("layers", ["attn", "lstm"], "layers="),
        ("channel_mixer", "moe", "channel_mixer='moe'"),
        ("mem_depth", 3, "mem_depth=3"),
        ("cms_periods", [0], "cms_periods"),
        ("reset_policy", {"blocks.0": "sometimes"}, "reset_policy"),
    ],
)
def test_bad_config_raises_one_line_error(field, value, msg):
    with pytest.raises(ValueError, match="HybridConfig") as e:
        HybridConfig(**{**SMALL, field: value})
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_pattern_strings():
    assert HybridConfig(layers="(SW)*2H").layers == ["mamba2", "swa", "mamba2", "swa", "hope"]
    assert HybridConfig(layers="attn,swa").layers == ["attn", "swa"]
    with pytest.raises(ValueError, match="HybridConfig.preset name"):
        HybridConfig.preset("gpt5")
    with pytest.raises(ValueError, match="HybridConfig.preset size"):
        HybridConfig.preset("mamba", "7b")


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("size", list(SIZES))
def test_preset_yaml_matches_python(name, size):
    path = Path(__file__).parents[2] / "configs" / "model" / f"{name}-{size}.yaml"
    assert HybridConfig(**yaml.safe_load(path.read_text())) == HybridConfig.preset(name, size)


def test_preset_yaml_files_are_generated_from_presets_py():
    folder = Path(__file__).parents[2] / "configs" / "model"
    want = preset_files()
    assert sorted(p.name for p in folder.glob("*.yaml")) == sorted(want), "stray or missing preset files"
    stale = [f for f, text in want.items() if (folder / f).read_text() != text]
    assert not stale, (
        f"{stale} differ from nestlm/models/presets.py: run python -m nestlm.models.presets --write configs/model"
    )


def test_preset_writer_writes_every_file(tmp_path):
    main(["--write", str(tmp_path / "model")])
    assert {p.name: p.read_text() for p in (tmp_path / "model").iterdir()} == preset_files()


def test_state_save_load_diff_and_config_check(tmp_path):
    model = small_model(["swa", "attn"])
    x = torch.randint(0, 61, (2, 30))
    with torch.no_grad():
        s = model(x[:, :20]).state
        sid = s.save(tmp_path / "s.safetensors")
        loaded = State.load(tmp_path / "s.safetensors")
        assert loaded.meta["id"] == sid and loaded.tokens_seen == 20
        a, b = model(x[:, 20:], s).logits, model(x[:, 20:], loaded).logits
        assert torch.equal(a, b)
        after = model(x[:, 20:], loaded).state
    assert after.meta["parent"] == sid
    d = s.diff(after)
    assert d["blocks.0.mixer.pos"] == pytest.approx(10 * 2**0.5) and all(v >= 0 for v in d.values())
    assert s.diff(loaded)["blocks.1.mixer.k"] == 0
    other = small_model(["swa", "swa"])
    with pytest.raises(ValueError, match="config"):
        other(x, loaded)
    (tmp_path / "bad.safetensors").write_bytes(b"not a state")
    with pytest.raises(ValueError, match="bad.safetensors"):
        State.load(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("name", PRESETS)
def test_every_tiny_preset_builds_trains_and_streams(name):
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.preset(name, "tiny"))
    assert 5e5 < model.num_params() < 5e6, model.num_params()
    x = torch.randint(0, 512, (2, 150))  # longer than the slowest CMS period: every parameter gets a gradient
    loss, _ = next_token_loss(model(x[:, :-1]).logits, x[:, 1:])
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - math.log(512)) < 0.5  # near-uniform at init
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad), "unused parameters"
    with torch.no_grad():
        a = model(x[:, :77])
        b = model(x[:, 77:], a.state)
        full = model(x)
    torch.testing.assert_close(torch.cat([a.logits, b.logits], 1), full.logits, rtol=1e-4, atol=1e-4)
