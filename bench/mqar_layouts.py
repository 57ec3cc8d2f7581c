"""Does the token layout decide whether a 2-layer attention model learns MQAR?

The same HybridLM and optimiser on four layouts of the same task (8 key-value pairs from the MQAR
env's key and value syllables, loss on the queried values only, fresh random sequences every step):

    zoology   k1 v1 k2 v2 ... k3 v3 k1 v1             Zoology's: the query key is the current token
    dsl       [P] mqar k1 v1 ... [/P] [Q] k3 [A] v3 [E] ...     the env's trajectory layout
    dsl-vk    the same with each briefing pair written value first (v1 k1)
    echo      [Q] k3 [A] k3 v3 [E]: the answer restates the key, the value follows it
    no-a      [Q] k3 v3 [E]: the trajectory layout without the `[A]` between key and value
    brief     the dsl briefing, then Zoology's bare queries k3 v3
    prefix    Zoology's layout after the briefing's opening `[P] mqar` (no `[/P]`)
    dsl-open  the env's trajectory layout without the briefing's closing `[/P]`
    brief-even  `brief` with one more token after `[/P]` (`[/P] [E]`): queries at the pairs' parity
    prefix-odd  `prefix` with one token between the pairs and the queries (`ok`), no boundary tag

    python bench/mqar_layouts.py --layout zoology --queries 8 --steps 3000 --schedule onecycle
    python bench/mqar_layouts.py --layout dsl --warm zoology:1000 --steps 2000   # a layout curriculum

Prints validation accuracy (256 held-out sequences) every `--every` steps and writes the curve as JSON
(bench/results/mqar_layouts/<layout>-<name>.json) with the settings, CPU time and load average.
Every layout uses nestlm's tokenizer and `nestlm.models.next_token_loss`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import resource
import time
from pathlib import Path

import torch

from nestlm.envs.mqar import KEYS, VALUES
from nestlm.envs.tokenizer import get_tokenizer
from nestlm.models import HybridConfig, HybridLM, next_token_loss

LAYOUTS = ("zoology", "dsl", "dsl-vk", "echo", "no-a", "brief", "prefix", "dsl-open", "brief-even", "prefix-odd")
BARE_QUERIES = ("zoology", "brief", "prefix", "brief-even", "prefix-odd")
OPEN_BRIEFING = ("zoology", "prefix", "dsl-open", "prefix-odd")  # no closing `[/P]`
RESULTS = Path(__file__).resolve().parent / "results" / "mqar_layouts"


def make_sequence(
    rng: random.Random, layout: str, n_queries: int, n_pairs: int = 8, order: str = "rounds"
) -> tuple[list[int], list[int]]:
    """One sequence (token ids) and the positions whose next token is a queried value.

    order: "rounds" asks every key once per round (as the env did up to acb-1.1), "iid" draws each
    query's key uniformly with replacement."""
    tok = get_tokenizer()
    tid = tok.token_to_id
    keys = rng.sample([tid(k) for k in KEYS], n_pairs)
    vals = [rng.choice([tid(v) for v in VALUES]) for _ in keys]
    seq, targets = [tok.bos_id], []
    if layout != "zoology":
        seq += [tid("[P]"), *tok.encode("mqar")]
    for k, v in zip(keys, vals):
        seq += [v, k] if layout == "dsl-vk" else [k, v]
    if layout not in OPEN_BRIEFING:
        seq.append(tid("[/P]"))
    if layout == "brief-even":
        seq.append(tid("[E]"))
    if layout == "prefix-odd":
        seq.append(tid("ok"))
    left: list[int] = []
    for _ in range(n_queries):
        if order == "iid":
            i = rng.randrange(n_pairs)
        else:
            left = left or rng.sample(range(n_pairs), n_pairs)
            i = left.pop()
        if layout in BARE_QUERIES:
            seq.append(keys[i])
        elif layout == "no-a":
            seq += [tid("[Q]"), keys[i]]
        elif layout == "echo":
            seq += [tid("[Q]"), keys[i], tid("[A]"), keys[i]]
        else:
            seq += [tid("[Q]"), keys[i], tid("[A]")]
        targets.append(len(seq) - 1)
        seq.append(vals[i])
        if layout not in BARE_QUERIES:
            seq.append(tid("[E]"))
    return seq, targets


def make_batch(
    rng: random.Random, layout: str, n_queries: int, batch: int, order: str = "rounds"
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [batch, T] and labels [batch, T] (the value at each query position, -100 elsewhere)."""
    rows = [make_sequence(rng, layout, n_queries, order=order) for _ in range(batch)]
    t = max(len(s) for s, _ in rows) - 1
    ids = torch.zeros(batch, t, dtype=torch.long)
    labels = torch.full((batch, t), -100)
    for r, (s, targets) in enumerate(rows):
        ids[r, : len(s) - 1] = torch.tensor(s[:-1])
        labels[r, targets] = torch.tensor([s[j + 1] for j in targets])
    return ids, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layout", choices=LAYOUTS, default="dsl")
    ap.add_argument("--queries", type=int, default=8, help="queries per sequence")
    ap.add_argument("--order", choices=("rounds", "iid"), default="rounds", help="which key each query asks")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--schedule", choices=("onecycle", "cosine"), default="onecycle")
    ap.add_argument("--warmup", type=int, default=100, help="cosine only")
    ap.add_argument("--layers", default="attn,attn")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0, help="initialisation and training-data seed")
    ap.add_argument(
        "--warm", default="", metavar="LAYOUT:STEPS", help="train the first STEPS of --steps on LAYOUT (a curriculum)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="", help="suffix of the results file")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    warm_layout, _, warm_steps = a.warm.partition(":")
    if a.warm and (warm_layout not in LAYOUTS or not warm_steps.isdigit()):
        ap.error(f"--warm {a.warm!r}: expected LAYOUT:STEPS with LAYOUT one of {', '.join(LAYOUTS)}")
    warm_steps = int(warm_steps or 0)
    out = a.out or RESULTS / f"{a.layout}{'-' + a.name if a.name else ''}.json"
    if out.is_dir():  # found before training, not after it
        ap.error(f"--out {out}: is a directory, expected the path of the JSON file to write")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cfg = HybridConfig.preset(
        "transformer", "tiny", layers=a.layers.split(","), n_heads=a.heads, d_model=a.d_model, rope_theta=a.rope_theta
    )
    model = HybridLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=a.weight_decay)
    if a.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.steps)
    else:
        span = max(1, a.steps - a.warmup)

        def factor(s: int) -> float:
            return (s + 1) / a.warmup if s < a.warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - a.warmup) / span))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    rng = random.Random(a.seed)
    val_ids, val_labels = make_batch(random.Random(123), a.layout, a.queries, 256, a.order)
    load0, cpu0, t0 = os.getloadavg(), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    curve = []
    for step in range(1, a.steps + 1):
        layout = warm_layout if step <= warm_steps else a.layout
        ids, labels = make_batch(rng, layout, a.queries, a.batch, a.order)
        loss, _ = next_token_loss(model(ids).logits, labels)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % a.every == 0 or step == a.steps:
            with torch.no_grad():
                pred = model(val_ids).logits.argmax(-1)
            mask = val_labels != -100
            acc = (pred[mask] == val_labels[mask]).float().mean().item()
            curve.append({"step": step, "train_loss": round(loss.item(), 4), "val_acc": round(acc, 4)})
            took = time.perf_counter() - t0
            msg = f"{a.layout} step {step} (on {layout}): loss {loss.item():.3f}, val acc {acc:.3f}, {took:.0f} s"
            print(msg, flush=True)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "settings": vars(a) | {"out": os.path.relpath(out, RESULTS.parents[2])},
        "curve": curve,
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 1),
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg(),
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
