"""Scoring, Coherence Horizon, report schema, bounded streaming, closed loop, and `nestlm eval`."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nestlm.envs import ENVS, final_window, generate_episode
from nestlm.envs.base import lag_bucket
from nestlm.envs.mqar import VALUES
from nestlm.envs.tokenizer import get_tokenizer
from nestlm.eval.bench import REPORT_KEYS, run_benchmark
from nestlm.eval.cli import main as eval_main
from nestlm.eval.report import adjusted, bootstrap_ci, coherence_horizon, horizon_summary, lag_summary
from nestlm.eval.scoring import closed_loop, score_episode, score_predictions, stream_argmax
from nestlm.models import HybridConfig, HybridLM
from nestlm.models.loading import load_model


class ScriptedModel(torch.nn.Module):
    """Predicts the episode's true next token at every position (optionally wrong at some positions).

    Its state is the absolute position, so chunked streaming is exercised exactly like a real model.
    """

    def __init__(self, tokens: list[int], wrong_at: set[int] = frozenset(), vocab: int = 512):
        super().__init__()
        self.tokens, self.wrong_at, self.vocab = list(tokens), set(wrong_at), vocab
        self.max_chunk = 0

    stream, generate = HybridLM.stream, HybridLM.generate  # they only call the model

    def forward(self, ids, state=None):
        pos = 0 if state is None else int(state)
        t = ids.shape[1]
        self.max_chunk = max(self.max_chunk, t)
        logits = torch.zeros(1, t, self.vocab)
        for j in range(t):
            i = pos + j
            nxt = self.tokens[i + 1] if i + 1 < len(self.tokens) else 0
            if i in self.wrong_at:
                nxt = (nxt + 1) % self.vocab
            # until its first wrong output, the history fed to it must be the episode's
            if i <= min(self.wrong_at, default=i):
                assert int(ids[0, j]) == self.tokens[i], (i, int(ids[0, j]), self.tokens[i])
            logits[0, j, nxt] = 1.0
        return SimpleNamespace(logits=logits, state=pos + t)


def tiny_model(preset: str = "swa-transformer", **kw) -> HybridLM:
    torch.manual_seed(0)
    if preset == "mixed":  # one sliding-window and one full-attention layer
        preset, kw = "transformer", dict(kw, layers=["swa", "attn"])
    cfg = HybridConfig.preset(preset, "tiny", d_model=32, n_heads=2, window=16, **kw)
    return HybridLM(cfg).eval()


# --- scoring ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env", list(ENVS))
def test_recorded_answers_score_one(env):
    ep = generate_episode(env, 300, 3, "test")
    model = ScriptedModel(ep.tokens)
    s = score_episode(model, ep, chunk_size=97)  # chunks not aligned to anything
    assert model.max_chunk == 97
    assert len(s.correct) == len(ep.probes) > 0 and all(s.correct) and s.first_error is None
    assert sum(s.in_window) == sum(p.step > 300 - final_window(300) for p in ep.probes) > 0
    assert s.window().correct == [True] * sum(s.in_window) and len(s.baselines) == len(ep.probes)


@pytest.mark.parametrize("env", list(ENVS))
def test_constant_answer_scores_chance(env):
    """A model that always gives the same answer (per question kind) scores the chance level."""
    tok = get_tokenizer()
    correct, chance = [], []
    # MQAR's values are fixed per episode, so its independent draws are the pairs: many short episodes
    n_eps, n_steps = (600, 16) if env == "mqar" else (6, 2000)
    for seed in range(n_eps):
        ep = generate_episode(env, n_steps, seed, "test")
        first_room = ep.steps[0].split()[3] if env == "courier" else None
        first_item = ep.steps[0].split()[2] if env == "shell" else None
        constant = {
            "update": "42",
            "query": "42",
            "recall": VALUES[0] if env == "mqar" else "0000",
            "where": first_room or "1",
            "peek": first_item,
            "action": "n",
        }
        preds = np.asarray(ep.tokens[1:] + [0])  # the true continuation...
        for p in ep.probes:  # ...except at answers, where the constant answer is given
            guess = tok.encode(constant[p.kind])
            a, b = p.span
            preds[a - 1 : b - 1] = guess if len(guess) == b - a else tok.pad_id
        c, _ = score_predictions(ep, preds)
        correct += c
        chance += [p.chance for p in ep.probes]
    acc, ch = float(np.mean(correct)), float(np.mean(chance))
    sd = math.sqrt(ch * (1 - ch) / len(correct))
    assert len(correct) > 300
    assert abs(acc - ch) <= 4 * sd + 1e-3, (env, acc, ch, len(correct))


def test_first_error_and_closed_loop_agree():
    ep = generate_episode("ledger", 120, 5, "test")
    _, a, e = ep.step_spans[37]
    wrong = a  # the model is wrong on the second answer token of step 37 (position a predicts a + 1)
    model = ScriptedModel(ep.tokens, wrong_at={wrong})
    preds = stream_argmax(model, ep.tokens, chunk_size=50)
    _, first = score_predictions(ep, preds)
    assert first == (37 if e - a > 1 else 38)
    assert closed_loop(ScriptedModel(ep.tokens, wrong_at={wrong}), ep) == first
    assert closed_loop(ScriptedModel(ep.tokens), ep) is None


def test_closed_loop_on_bare_steps():
    """Zoology's MQAR layout has no `[E]`: each answer is decoded to its own length."""
    ep = generate_episode("mqar", 60, 2, "val")
    _, a, _ = ep.step_spans[41]
    assert closed_loop(ScriptedModel(ep.tokens), ep) is None
    assert closed_loop(ScriptedModel(ep.tokens, wrong_at={a - 1}), ep) == 41


def test_closed_loop_matches_teacher_forced_on_a_real_model():
    model = tiny_model()
    # a model that has learned nothing errs early; both paths must name the same step
    for env in ENVS:
        ep = generate_episode(env, 30, 1, "test")
        _, first = score_predictions(ep, stream_argmax(model, ep.tokens, chunk_size=64))
        assert closed_loop(model, ep) == first


# --- aggregation ----------------------------------------------------------------------------------------
def test_coherence_horizon_arithmetic():
    c = 0.01
    ok = c + 0.9 * (1 - c)  # exactly at the threshold after chance adjustment
    assert coherence_horizon({20: (1.0, c), 200: (0.95, c), 2000: (0.5, c), 20000: (0.99, c)}) == 200
    assert coherence_horizon({20: (ok, c), 200: (ok - 1e-6, c)}) == 20
    assert coherence_horizon({20: (0.89, 0.0)}) == 0
    assert coherence_horizon({20: (0.95, 0.5), 200: (0.96, 0.5)}) == 0  # 0.9 / 0.92 after adjustment
    assert coherence_horizon({20: (1.0, 0.25), 200: (None, 0.25), 2000: (1.0, 0.25)}) == 20
    assert coherence_horizon({2000: (1.0, 0.1), 20: (1.0, 0.1), 200: (1.0, 0.1)}) == 2000
    assert adjusted(0.25, 0.25) == 0.0 and adjusted(1.0, 0.3) == 1.0


def test_bootstrap_ci_is_episode_level():
    lo, hi = bootstrap_ci([10, 0, 10, 0], [10, 10, 10, 10], n_boot=2000)
    assert lo < 0.5 < hi and lo <= 0.25 and hi >= 0.75  # episodes disagree: a wide interval
    assert bootstrap_ci([5, 5, 5], [10, 10, 10]) == (0.5, 0.5)


def test_horizon_summary_pools_probes():
    from nestlm.eval.scoring import EpisodeScore

    def mk(correct, kinds, lags, window, base):
        n = len(correct)
        return EpisodeScore("ledger", 100, 0, 1000, correct, kinds, lags, [0.01] * n, base, window, None, 1.0)

    hb = [{"recent": 1.0, "uniform": 0.5}, {"recent": 0.0, "uniform": 0.5}, {"recent": 0.0, "uniform": 0.25}]
    rb = [{"recent": 0.0, "uniform": 0.5}]
    a = mk([True, True, False, True], ["query"] * 3 + ["recall"], [3, 30, 300, 5], [True, True, True, False], hb + rb)
    b = mk([False], ["recall"], [2], [True], rb)
    s = horizon_summary([a, b])  # the probe outside a's final window is not counted
    assert s["accuracy"] == 0.5 and s["n_probes"] == 4 and s["chance"] == pytest.approx(0.01)
    # baselines: per kind the best heuristic (query: uniform 1.25/3 beats recent 1/3; recall: uniform 0.5)
    assert s["by_kind"]["query"] == {
        "accuracy": 2 / 3,
        "n_probes": 3,
        "chance": pytest.approx(0.01),
        "baseline": pytest.approx(1.25 / 3),
    }
    assert s["by_kind"]["recall"] == {"accuracy": 0.0, "n_probes": 1, "chance": 0.01, "baseline": 0.5}
    assert s["baseline"] == pytest.approx((1.25 + 0.5) / 4)
    assert list(s["by_lag"]) == ["1-10", "10-100", "100-1000"]
    every = lag_summary([a, b])  # every probe, in or out of the window
    assert every["1-10"]["n_probes"] == 3 and every["1-10"]["accuracy"] == pytest.approx(2 / 3)
    assert lag_bucket(1) == "1-10" and lag_bucket(10) == "10-100" and lag_bucket(10_000) == "10000+"


# --- runner, report, memory ---------------------------------------------------------------------------------
def test_report_schema():
    report = run_benchmark(tiny_model(), [*ENVS, "ledger:1"], [5, 20], {5: 2, 20: 2}, seed=1, progress=False)
    json.dumps(report)  # serialisable, no NaN
    assert set(REPORT_KEYS) <= set(report)
    assert set(report["envs"]) == {*ENVS, "ledger:1"}
    for env in report["envs"]:
        r = report["envs"][env]
        assert {"horizons", "coherence_horizon", "tokens_per_step", "by_lag"} <= set(r)
        assert set(r["horizons"]) == {"5", "20"}
        for m in r["horizons"].values():
            assert {"accuracy", "ci95", "n_probes", "chance", "baseline"} <= set(m)
            assert m["n_probes"] > 0 and 0 <= m["accuracy"] <= 1 and len(m["ci95"]) == 2
            assert m["chance"] <= m["baseline"] <= 1
        assert r["by_lag"] and all({"accuracy", "n_probes", "baseline"} <= set(v) for v in r["by_lag"].values())
        assert sum(v["n_probes"] for v in r["by_lag"].values()) >= sum(m["n_probes"] for m in r["horizons"].values())
        assert r["coherence_horizon"] in (0, 5, 20)
    assert report["coherence_horizon"] == min(r["coherence_horizon"] for r in report["envs"].values())
    assert report["peak_rss_mb"] > 0 and report["seconds"] > 0


def test_streaming_state_is_bounded_and_windowed_full_attention():
    swa = tiny_model()
    ep_short, ep_long = generate_episode("shell", 20, 0, "test"), generate_episode("shell", 250, 0, "test")
    sizes = []
    for ep in (ep_short, ep_long):
        state = None
        ids = torch.tensor(ep.tokens)[None]
        for s in range(0, ids.shape[1], 128):
            state = swa(ids[:, s : s + 128], state=state).state
        sizes.append(sum(t.numel() for t in state.flat().values()))
    assert sizes[0] == sizes[1]  # the state does not grow with the episode
    # a full-attention layer gets a sliding window for long episodes: bounded, and chunking-invariant
    model = tiny_model("mixed")
    assert len(model.full_attention_layers()) == 1
    with model.attention_window(32):
        a = stream_argmax(model, ep_long.tokens, chunk_size=100)
        b = stream_argmax(model, ep_long.tokens, chunk_size=len(ep_long.tokens))
        state = model(torch.tensor(ep_long.tokens)[None]).state
        assert max(t.shape[1] for n, t in state.flat().items() if n.endswith(".k")) <= 31
    assert (a == b).mean() > 0.999
    assert model.full_attention_layers()[0].window is None  # restored
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="window"), model.attention_window(bad):
            pass


def test_auto_episode_counts_reach_the_ci_target():
    from nestlm.eval.bench import AUTO, AUTO_PROBES, episodes_at

    eps = list(episodes_at("ledger:1", 20, AUTO, 0, "val"))
    window = [p for ep in eps for p in ep.probes if p.step > 20 - final_window(20)]
    assert len(window) >= AUTO_PROBES and len(window) - AUTO_PROBES < 10
    assert 1.96 * math.sqrt(0.25 / len(window)) <= 0.05  # the half-width of a binomial CI at p = 0.5
    assert len(list(episodes_at("ledger", 2000, AUTO, 0, "test"))) == 8
    assert [ep.seed for ep in episodes_at("ledger", 20, 3, 5, "test")] == [5 * 1_000_003 + i for i in range(3)]


def test_window_policy_in_report():
    report = run_benchmark(tiny_model("mixed"), ["ledger"], [5, 60], {5: 1, 60: 1}, attn_window=256, progress=False)
    assert report["attention"]["full_attention_layers"] == 1
    assert report["envs"]["ledger"]["horizons"]["60"]["attention_window"] == [256]
    auto = run_benchmark(tiny_model("mixed"), ["ledger"], [5, 60], {5: 1, 60: 1}, trained_context=128, progress=False)
    assert auto["envs"]["ledger"]["horizons"]["5"]["attention_window"] is None
    assert auto["envs"]["ledger"]["horizons"]["60"]["attention_window"] == [128]


# --- command line -------------------------------------------------------------------------------------
def test_cli_writes_report_and_plot(tmp_path, capsys):
    export = tmp_path / "export"
    tiny_model().save_pretrained(export)
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    eval_main(
        [
            "--ckpt",
            str(export),
            "--envs",
            "ledger,shell",
            "--horizons",
            "5,20",
            "--episodes",
            "2",
            "--seed",
            "3",
            "--out",
            str(out),
            "--plot",
            str(png),
            "--closed-loop",
            "--no-progress",
        ]
    )
    report = json.loads(out.read_text())
    assert set(REPORT_KEYS) <= set(report) and set(report["envs"]) == {"ledger", "shell"}
    assert report["envs"]["shell"]["closed_loop"]["episodes"] == 2
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "overall CH0.9" in capsys.readouterr().out
    before = out.read_text()
    with pytest.raises(SystemExit, match="exists"):
        eval_main(["--ckpt", str(export), "--out", str(out)])
    assert out.read_text() == before
    with pytest.raises(SystemExit, match="does not exist"):
        eval_main(["--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="--horizons"):
        eval_main(["--ckpt", str(export), "--horizons", "20,x", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="--envs"):
        eval_main(
            [
                "--ckpt",
                str(export),
                "--envs",
                "maze",
                "--horizons",
                "5",
                "--out",
                str(tmp_path / "x.json"),
                "--no-progress",
            ]
        )


def test_load_lightning_style_checkpoint(tmp_path):
    model = tiny_model()
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "nestlm_config": model.config.to_dict(),
        "hyper_parameters": {"preset": "swa-transformer"},
        "datamodule_hyper_parameters": {"seq_len": 384},
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    (tmp_path / "wandb_run_id").write_text("abc123\n")
    loaded, info = load_model(tmp_path / "last.ckpt")
    assert info["kind"] == "ckpt" and info["trained_context"] == 384 and info["wandb_run_id"] == "abc123"
    ids = torch.randint(0, 300, (1, 40))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    # the context can also come from the run's resolved config (what `nestlm fit` writes)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    del ckpt["datamodule_hyper_parameters"]
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    (run / "config.yaml").write_text("data:\n  init_args:\n    seq_len: 256\n")
    assert load_model(run / "checkpoints" / "last.ckpt")[1]["trained_context"] == 256
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.ckpt"):
        load_model(tmp_path / "bad.ckpt")


def test_wandb_eval_run_joins_the_training_group(tmp_path, monkeypatch):
    import wandb

    calls = {}

    class FakeRun:
        dir = str(tmp_path / "wandb-run")
        summary: dict = {}

        def log(self, d):
            calls["log"] = d

        def finish(self):
            calls["finished"] = True

    def fake_init(**kw):
        calls["init"] = kw
        return FakeRun()

    monkeypatch.setattr(wandb, "init", fake_init)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    run = tmp_path / "run"
    tiny_model().save_pretrained(run / "export")
    (run / "wandb_run_id").write_text("trainrun42\n")
    eval_main(
        [
            "--ckpt",
            str(run / "export"),
            "--envs",
            "shell",
            "--horizons",
            "5",
            "--episodes",
            "1",
            "--out",
            str(tmp_path / "r.json"),
            "--wandb",
            "--no-progress",
        ]
    )
    init = calls["init"]
    assert init["group"] == "trainrun42" and init["job_type"] == "eval" and init["mode"] == "offline"
    assert "acb/shell/acc@5" in calls["log"] and calls["finished"]
