"""Answer-weighted objective, curriculum stages and their determinism, validation by probe kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nestlm.envs import generate_episode
from nestlm.envs.tokenizer import get_tokenizer
from nestlm.models import next_token_loss
from nestlm.train.data import IGNORE, SyntheticTrajectories


def answer_targets_from_text(ep) -> set[int]:
    """Target positions whose next token is a scored answer token, found from the text alone: the
    tokens after a probe step's `[A]` up to its `[E]` (only the direction of a COURIER `go`). A step
    is a probe when its answer is not `ok`/`wait`/`take X`/`drop X` (LEDGER `[O]` updates carry a
    number), which the envs' docstrings define; a bare MQAR step `k v` answers its last token."""
    tok = get_tokenizer()
    a_id, e_id = tok.token_to_id("[A]"), tok.token_to_id("[E]")
    out, pos = set(), 1  # after <bos>
    for line in ep.steps:
        ids = tok.encode(line)
        if "[A]" in line.split():
            a = ids.index(a_id)
            answer = ids[a + 1 : ids.index(e_id)]
            words = tok.decode(answer).split()
            scored = words not in (["ok"], ["wait"]) and words[0] not in ("take", "drop")
            if scored:
                if words[0] == "go":
                    answer_pos = [pos + a + 1 + len(answer) - 1]
                else:
                    answer_pos = range(pos + a + 1, pos + a + 1 + len(answer))
                out |= {p - 1 for p in answer_pos}  # the target at position p - 1 is token p
        elif not line.startswith("[P]"):  # a bare MQAR step `k v`: the value is the answer
            out.add(pos + len(ids) - 2)
        pos += len(ids)
    return out


@pytest.mark.parametrize("envs", [["ledger:1", "mqar"], ["shell:1", "courier:1"], ["ledger", "courier"]])
def test_loss_weights_fall_exactly_on_answer_spans(envs):
    dm = SyntheticTrajectories(envs=envs, batch_size=6, seq_len=384, min_steps=5, max_steps=40, loss="answers")
    rng_specs = dm.episode_specs(np.random.default_rng(0), dm.stages[0], 6)
    batch = dm._episode_batch(rng_specs, "train", 384)
    for row, (env, n, seed) in enumerate(rng_specs):
        ep = generate_episode(env, n, seed, "train")
        want = {p for p in answer_targets_from_text(ep) if p < 384}
        got = set(torch.nonzero(batch["loss_weight"][row]).flatten().tolist())
        assert got == want, (env, n, seed)
        assert set(torch.nonzero(batch["answer"][row] >= 0).flatten().tolist()) == want
        assert (batch["labels"][row][sorted(got)] != IGNORE).all()


def test_loss_modes():
    kw = dict(envs=["ledger:1"], batch_size=3, seq_len=200, min_steps=5, max_steps=30)
    all_ = SyntheticTrajectories(loss="all", **kw).train_batch(0)
    w = SyntheticTrajectories(loss="weighted", other_weight=0.05, **kw).train_batch(0)
    a = SyntheticTrajectories(loss="answers", **kw).train_batch(0)
    assert torch.equal(all_["input_ids"], a["input_ids"])  # the objective does not change the data
    labelled, ans = all_["labels"] != IGNORE, a["answer"] >= 0
    assert torch.equal(all_["loss_weight"], labelled.float())
    assert torch.equal(a["loss_weight"], ans.float())
    assert torch.allclose(w["loss_weight"], torch.where(ans, 1.0, torch.where(labelled, 0.05, 0.0)))
    with pytest.raises(ValueError, match="loss='nope'"):
        SyntheticTrajectories(loss="nope", **kw)


def test_weighted_loss_matches_a_plain_computation():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 7, 11), torch.randint(0, 11, (2, 7))
    labels[0, :2] = IGNORE
    w = torch.rand(2, 7) * (labels != IGNORE)
    loss, n = next_token_loss(logits, labels, w)
    ce = torch.stack(
        [
            -torch.log_softmax(logits[b, t], -1)[labels[b, t]] if labels[b, t] != IGNORE else torch.tensor(0.0)
            for b in range(2)
            for t in range(7)
        ]
    ).view(2, 7)
    assert torch.allclose(loss, (ce * w).sum() / w.sum()) and torch.allclose(n, w.sum())
    plain, count = next_token_loss(logits, labels)
    assert torch.allclose(plain, ce[labels != IGNORE].mean()) and count == (labels != IGNORE).sum()


CURRICULUM = [
    {"envs": ["mqar"], "min_steps": 5, "max_steps": 8, "until_step": 4},
    {"envs": ["ledger:1"], "gate": {"min_accuracy": 0.5, "every": 2, "episodes": 4}, "until_step": 30},
    {"envs": ["ledger:2", "shell:1"], "max_steps": 40},
]


def make(**kw):
    args = dict(batch_size=4, seq_len=128, min_steps=10, max_steps=20, curriculum=CURRICULUM, seed=3)
    return SyntheticTrajectories(**{**args, **kw})


def test_curriculum_stages_by_step_and_gate():
    dm = make()
    assert [dm.stage_at(s) for s in (0, 3, 4, 29, 30, 500)] == [0, 0, 1, 1, 2, 2]
    assert dm.stages[1]["min_steps"] == 5 and dm.stages[2]["min_steps"] == 5 and dm.stages[2]["max_steps"] == 40
    assert dm.gate_due(4) == dm.stages[1]["gate"] and dm.gate_due(5) is None and dm.gate_due(2) is None
    dm.pass_gate(6)
    assert dm.gate_due(8) is None  # passed: no more checks
    assert [dm.stage_at(s) for s in (6, 7, 8)] == [1, 1, 2]  # effective two steps later
    state = dm.state_dict()
    fresh = make()
    fresh.load_state_dict(state)
    assert [fresh.stage_at(s) for s in range(40)] == [dm.stage_at(s) for s in range(40)]


def test_curriculum_batches_are_pure_functions_of_seed_index_and_stage():
    a, b = make(), make()
    for k in (0, 1, 3, 4, 7, 40):
        x, y = a.train_batch(k), b.train_batch(k)
        assert all(torch.equal(x[n], y[n]) for n in ("input_ids", "labels", "answer", "loss_weight"))
    tok = get_tokenizer()
    first = tok.decode(a.train_batch(0)["input_ids"][0].tolist())
    assert first.startswith("[P] mqar")
    assert tok.decode(a.train_batch(5)["input_ids"][0].tolist()).startswith("[P] ledger")
    # a gate passed at step 6 changes batches from step 8 on only
    b.pass_gate(6)
    for k in (5, 6, 7):
        assert torch.equal(a.train_batch(k)["input_ids"], b.train_batch(k)["input_ids"])
    assert not torch.equal(a.train_batch(8)["input_ids"], b.train_batch(8)["input_ids"])
    # with segments (truncated BPTT) the stage follows the window's first optimizer step
    seg = make(seq_len=256, segment_len=64)
    assert seg.n_segments == 4 and seg.window_stage(0) == 0 and seg.window_stage(1) == 1
    w0 = [seg.train_batch(k) for k in range(4)]
    assert [bool(b["reset"].all()) for b in w0] == [True, False, False, False]
    full = seg.window_batch(0, 0)
    assert torch.equal(torch.cat([b["answer"] for b in w0], 1), full["answer"])


def test_length_curriculum_sets_each_stage_rows_and_batch():
    """Stages may train shorter rows and other batch sizes (short episodes in short rows first); the
    values carry over to later stages and the top-level seq_len stays the trained context."""
    stages = [
        {"max_steps": 8, "seq_len": 64, "batch_size": 6, "until_step": 3},
        {"min_steps": 12, "max_steps": 16, "until_step": 5},
        {"seq_len": 256, "batch_size": 2},
    ]
    dm = SyntheticTrajectories(envs=["ledger:1"], batch_size=4, seq_len=256, min_steps=4, curriculum=stages, seed=1)
    shapes = [tuple(dm.train_batch(k)["input_ids"].shape) for k in (0, 2, 3, 4, 5)]
    assert shapes == [(6, 64), (6, 64), (6, 64), (6, 64), (2, 256)]
    assert dm.seq_len == 256
    # the rows of a stage are its episodes cut to the stage's seq_len, labels masked past the end
    b = dm.train_batch(0)
    assert (b["labels"][b["input_ids"] == dm.pad_id] == IGNORE).all()
    tok = get_tokenizer()
    for row in dm.train_batch(5)["input_ids"]:  # 12-16 steps: longer than 64 tokens, cut at 256 at most
        assert len(tok.decode(row.tolist()).split("[E]")) - 1 >= 12


@pytest.mark.parametrize(
    "kw, match",
    [
        (
            {"curriculum": [{"seq_len": 512, "until_step": 2}, {}]},
            r"curriculum\[0\]\.seq_len=512 .*at most the top-level",
        ),
        ({"curriculum": [{"batch_size": 0}]}, r"curriculum\[0\]\.batch_size=0 is invalid"),
        (
            {"segment_len": 64, "curriculum": [{"seq_len": 128, "until_step": 2}, {}]},
            r"curriculum\[0\]\.seq_len=128 is invalid with segment_len",
        ),
    ],
)
def test_stage_rows_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        SyntheticTrajectories(seq_len=256, **kw)


@pytest.mark.parametrize(
    "curriculum, match",
    [
        ([{"envs": ["ledger:1"]}, {"envs": ["mqar"]}], "needs until_step or gate"),
        ([{"until_step": 5}, {"until_step": 3}, {}], "increasing"),
        ([{"envs": ["ledger:9"], "until_step": 2}, {}], "has levels"),
        ([{"colour": "red"}], "keys from"),
        ([{"gate": {"every": 3}}, {}], "min_accuracy"),
        ([{"until_step": 3}, {"until_step": 9}], "the last stage has no end"),
        ([{"max_steps": 500}], "max_steps"),
    ],
)
def test_curriculum_errors_name_the_field(curriculum, match):
    with pytest.raises(ValueError, match=match):
        SyntheticTrajectories(curriculum=curriculum)


def test_envs_beside_a_curriculum_must_be_the_stages_envs():
    """A config layered on one with a curriculum (the default run's) must not train on the stages'
    envs while it names others: it says so, and `curriculum: null` trains on its own envs."""
    stages = [{"envs": ["ledger:1"], "until_step": 5}, {"envs": ["ledger:1", "shell:1"]}]
    with pytest.raises(ValueError, match=r"SyntheticTrajectories.envs=\['mqar'\] differs .*curriculum: null"):
        SyntheticTrajectories(envs=["mqar"], curriculum=stages)
    assert SyntheticTrajectories(envs=["shell:1", "ledger:1"], curriculum=stages).stages[1]["envs"] == [
        "ledger:1",
        "shell:1",
    ]
    assert SyntheticTrajectories(envs=["mqar"], curriculum=None).stages[0]["envs"] == ["mqar"]


def test_validation_scores_every_probe_by_env_and_kind():
    from nestlm.models import HybridConfig, HybridLM
    from nestlm.train.module import answer_scores

    dm = make()
    val = dm.val_batches()
    assert len(val) == dm.val_batches_n * 4  # mqar, ledger:1, ledger:2, shell:1
    keys = {k for b in val for k in b["probe_keys"]}
    assert {"mqar/recall", "ledger:1/query", "shell:1/where"} <= keys
    # ledger:2, whose answers have several tokens (ledger:1's have one)
    b = next(b for b in val if b["probe_keys"][0].startswith("ledger:2"))
    # a model that outputs the true next token scores 1 on every probe
    labels = b["labels"].clamp(min=0)
    perfect = torch.nn.functional.one_hot(labels, 512).float() * 10
    scores = answer_scores(perfect, b)
    assert scores and all(acc == 1.0 for acc, _, _ in scores.values())
    assert sum(c for _, _, c in scores.values()) == len(b["probe_keys"])
    # one wrong token in a multi-token answer makes that answer wrong
    multi = next(i for i in range(len(b["probe_keys"])) if (b["answer"] == i).sum() > 1)
    r, t = torch.nonzero(b["answer"] == multi)[0].tolist()
    perfect[r, t] = 0
    perfect[r, t, (labels[r, t] + 1) % 512] = 10
    worse = answer_scores(perfect, b)
    key = b["probe_keys"][multi]
    assert worse[key][0] == pytest.approx(scores[key][0] - 1 / scores[key][2])
    model = HybridLM(HybridConfig.preset("transformer", "tiny", d_model=32, n_heads=2))
    assert all(0 <= acc <= 1 for acc, _, _ in answer_scores(model(b["input_ids"]).logits, b).values())


def test_trained_lags_cover_long_episodes_with_segments():
    short = SyntheticTrajectories(envs=["ledger:1"], batch_size=4, seq_len=128, min_steps=150, max_steps=200)
    long = SyntheticTrajectories(
        envs=["ledger:1"], batch_size=4, seq_len=2048, segment_len=256, min_steps=150, max_steps=200
    )
    a, b = short.trained_lags(8), long.trained_lags(8)
    assert sum(b.values()) > 3 * sum(a.values())  # a 128-token window sees only the first steps
    assert b.get("10-100", 0) > a.get("10-100", 0)
