"""LitHybridLM: weight-decay groups, the warmup + cosine schedule, activation checkpointing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nestlm.models import next_token_loss
from nestlm.train.module import LitHybridLM, param_groups

TINY = {"vocab_size": 97, "d_model": 32, "n_heads": 2, "window": 8, "layers": ["attn", "swa"]}


def test_no_decay_on_norms_biases_1d_and_flagged_params():
    module = LitHybridLM(preset="transformer", overrides=TINY)
    model = module.model
    model.blocks[0].mixer.wq.weight._no_weight_decay = True
    decay, keep = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert not ids(decay) & ids(keep)
    assert ids(decay) | ids(keep) == {id(p) for p in model.parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p in keep["params"]:
        n = names[id(p)]
        assert p.dim() < 2 or "norm" in n or n.endswith("bias") or n == "blocks.0.mixer.wq.weight", n
    for p in decay["params"]:
        assert p.dim() >= 2 and "norm" not in names[id(p)]
    assert id(model.embed.weight) in ids(decay)


@pytest.mark.parametrize("warmup", [0, 5])
def test_schedule_is_linear_warmup_then_cosine(warmup):
    module = LitHybridLM(
        preset="transformer", overrides=TINY, lr=1e-2, warmup_steps=warmup, decay_steps=25, min_lr_ratio=0.1
    )
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"
    for step in range(30):
        lr = opt.param_groups[0]["lr"]
        assert lr == pytest.approx(1e-2 * module.lr_factor(step, 25), rel=1e-6, abs=1e-12), step
        opt.step()
        sched.step()
    assert module.lr_factor(25, 25) == pytest.approx(0.1)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = LitHybridLM(preset="transformer", overrides=TINY).double()
    ckpt = LitHybridLM(preset="transformer", overrides=TINY, activation_checkpointing=True).double()
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 97, (2, 19))
    grads = []
    for m in (plain, ckpt):
        loss, _ = next_token_loss(m(ids[:, :-1]).logits, ids[:, 1:])
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-10, atol=1e-14)


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="warmup_steps"):
        LitHybridLM(preset="transformer", overrides=TINY, warmup_steps=-1)
    with pytest.raises(ValueError, match="preset"):
        LitHybridLM(preset=None)
    with pytest.raises(ValueError, match="HybridConfig"):
        LitHybridLM(preset="transformer", overrides={"d_model": 0})


def test_memory_update_norms_cover_memory_layers_only():
    from nestlm.train.callbacks import memory_update_norms

    module = LitHybridLM(
        preset="hope-hybrid",
        overrides={
            "vocab_size": 97,
            "d_model": 32,
            "n_heads": 2,
            "window": 8,
            "layers": ["swa", "hope"],
            "channel_mixers": ["mlp", "cms"],
            "mem_heads": 2,
            "mem_head_dim": 8,
            "cms_periods": [None, 4],
        },
    )
    ids = torch.randint(0, 97, (2, 13))
    norms = memory_update_norms(module.model, module(ids).state)
    assert norms and all(k.startswith(("memory/blocks.1.mixer.", "memory/blocks.1.channel.")) for k in norms)
    assert any(v > 0 for v in norms.values())
    assert any(".channel." in k for k in norms) and any(".mixer." in k for k in norms)


def test_carried_state_survives_a_weights_only_checkpoint(tmp_path):
    module = LitHybridLM(preset="transformer", overrides=TINY)
    module._carry = module(torch.randint(0, 97, (2, 11))).state.detach()
    ckpt = {}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "c.ckpt")
    again = LitHybridLM(preset="transformer", overrides=TINY)
    again.on_load_checkpoint(torch.load(tmp_path / "c.ckpt", weights_only=True))
    a, b = module._carry.flat(), again._carry.flat()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again._carry.meta["tokens_seen"] == 11


def _attach(module: LitHybridLM, ckpt_path: str | None = None) -> LitHybridLM:
    module._trainer = SimpleNamespace(ckpt_path=ckpt_path, datamodule=None)
    return module


def test_init_weights_starts_a_fresh_fit_from_an_export_or_a_checkpoint(tmp_path):
    source = LitHybridLM(preset="transformer", overrides=TINY)
    source.model.save_pretrained(tmp_path / "export")
    torch.save({"state_dict": source.state_dict(), "nestlm_config": vars(source.cfg)}, tmp_path / "run.ckpt")
    want = source.model.state_dict()
    for path in (tmp_path / "export", tmp_path / "run.ckpt"):
        module = _attach(LitHybridLM(preset="transformer", overrides=TINY, init_weights=str(path)))
        assert not torch.equal(module.model.embed.weight, want["embed.weight"])  # a fresh init differs
        module.setup("fit")
        got = module.model.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_init_weights_is_ignored_when_resuming_and_refuses_another_model(tmp_path):
    LitHybridLM(preset="transformer", overrides=TINY).model.save_pretrained(tmp_path / "export")
    module = _attach(LitHybridLM(preset="transformer", overrides=TINY, init_weights=str(tmp_path / "export")), "last")
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    module.setup("fit")  # the resumed checkpoint brings the weights
    assert all(torch.equal(before[k], v) for k, v in module.model.state_dict().items())
    wider = _attach(
        LitHybridLM(preset="transformer", overrides={**TINY, "d_model": 48}, init_weights=str(tmp_path / "export"))
    )
    with pytest.raises(ValueError, match=r"init_weights=.*another model.*d_model"):
        wider.setup("fit")
    missing = _attach(LitHybridLM(preset="transformer", overrides=TINY, init_weights=str(tmp_path / "nothing")))
    with pytest.raises(FileNotFoundError, match="init_weights: .*nothing"):
        missing.setup("fit")
