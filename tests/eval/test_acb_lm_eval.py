"""lm-evaluation-harness adapter: registered name, exact log-likelihoods, greedy generation, local task."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval")

import nestlm.eval  # noqa: E402,F401  (registers the model)
from nestlm.envs.tokenizer import get_tokenizer  # noqa: E402
from nestlm.models import HybridConfig, HybridLM  # noqa: E402


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.preset("swa-transformer", "tiny", d_model=32, n_heads=2, window=8)).eval()
    path = tmp_path_factory.mktemp("lm") / "export"
    model.save_pretrained(path)
    return path, model


def _req(*args):
    from lm_eval.api.instance import Instance

    return Instance(request_type="x", doc={}, arguments=args, idx=0)


@torch.no_grad()
def test_registered_and_exact(export):
    from lm_eval.api.registry import get_model

    path, model = export
    lm = get_model("nestlm").create_from_arg_string(f"pretrained={path},chunk_size=5")
    tok = get_tokenizer()
    ctx, cont = "[O] dep keva 35 [A]", " 82 [E]"
    ((ll, greedy),) = lm.loglikelihood([_req(ctx, cont)])
    ids = tok.encode(ctx + cont)
    n = len(tok.encode(cont))
    logits = model(torch.tensor(ids[:-1])[None]).logits[0]
    lp = F.log_softmax(logits.float(), -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert ll == pytest.approx(float(lp[-n:].sum()), abs=1e-4)
    assert greedy == bool((logits[-n:].argmax(-1) == torch.tensor(ids[-n:])).all())
    # rolling: every token of the text given <bos>
    (roll,) = lm.loglikelihood_rolling([_req("[Q] where keva [A] 3 [E]")])
    ids = [tok.bos_id] + tok.encode("[Q] where keva [A] 3 [E]")
    lp = F.log_softmax(model(torch.tensor(ids[:-1])[None]).logits[0].float(), -1)
    assert roll == pytest.approx(float(lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum()), abs=1e-4)
    assert math.isfinite(roll) and roll < 0
    # greedy generation equals HybridLM.generate
    (text,) = lm.generate_until([_req("[O] rot [A]", {"until": ["[E]"], "max_gen_toks": 6})])
    prompt = torch.tensor([[tok.bos_id] + tok.encode("[O] rot [A]")])
    new, _ = model.generate(prompt, 6)
    new_ids = new[0].tolist()
    if tok.eos_id in new_ids:
        new_ids = new_ids[: new_ids.index(tok.eos_id)]
    assert text == tok.decode(new_ids).split("[E]")[0]


def test_local_json_task(export, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, _ = export
    docs = [
        {"question": f"[Q] where keva [A] {i}", "choices": ["ok", "no"], "answer": i % 2, "target": "ok"}
        for i in range(4)
    ]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "mc.yaml").write_text(f"""task: acb_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    (tmp_path / "gen.yaml").write_text(f"""task: acb_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["[E]"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
""")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    res = simple_evaluate(
        model="nestlm",
        model_args=f"pretrained={path}",
        tasks=["acb_local_mc", "acb_local_gen"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        batch_size=1,
    )
    mc = res["results"]["acb_local_mc"]
    assert 0.0 <= mc["acc,none"] <= 1.0
    assert "exact_match,none" in res["results"]["acb_local_gen"]
