"""kvbench as an lm-eval model (kvbench/lm_eval_bridge.py) and lm-eval tasks inside kvbench (tasks/lm_eval.py).

References are independent computations with the plain HF model (SDPA attention): one forward over
context+continuation for the full cache; for a compressed cache, the kept (post-RoPE) keys/values are loaded
into a transformers DynamicCache and the continuation is run by the HF model with positions continuing from
the original context length.
"""
import copy
import dataclasses
import json
import random

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from kvbench.compat import cache_kwargs  # noqa: E402
from kvbench.engine import Engine  # noqa: E402
from kvbench.lm_eval_bridge import KVBenchLM, prefill_context, register  # noqa: E402
from kvbench.method import build_method  # noqa: E402
from kvbench.models import load_model  # noqa: E402
from kvbench.task import Query, Sample  # noqa: E402

WORDS = "apple river stone cloud green quiet seven table market window orange Paris blue eight".split()


@pytest.fixture(scope="module")
def lm():
    return load_model("synthetic", shape="tiny", device="cpu", dtype="float32", seed=0)


@pytest.fixture(scope="module")
def ref_model(lm):
    m = copy.deepcopy(lm.model)
    m.set_attn_implementation("sdpa")
    return m


def text(n_words: int, seed: int) -> str:
    r = random.Random(seed)
    return " ".join(r.choice(WORDS) for _ in range(n_words))


def ll_request(ctx: str, cont: str) -> Instance:
    return Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=0)


def encode_pair(tok, ctx: str, cont: str):
    """Context without trailing spaces: the whole text's ids split after the context's ids."""
    whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
    n = len(tok(ctx, add_special_tokens=False)["input_ids"])
    return whole[:n], whole[n:]


@torch.no_grad()
def hf_full_loglikelihood(model, ctx_ids, cont_ids):
    ids = torch.tensor([ctx_ids + cont_ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    pred = logp[len(ctx_ids) - 1: -1]  # the rows predicting the continuation tokens
    tgt = torch.tensor(cont_ids)
    return float(pred.gather(1, tgt[:, None]).sum()), bool((pred.argmax(-1) == tgt).all())


@torch.no_grad()
def hf_on_compressed(model, cache, first_logits, n_ctx, cont_ids):
    """Continuation log-likelihood with the HF model over the kept keys/values of a (uniform) kvbench cache."""
    dc = DynamicCache()
    for i, layer in enumerate(cache.kv):
        assert layer.is_uniform()
        k, v, _ = layer.dense()
        dc.update(k[None], v[None], i)
    kept = cache.kv[0].head_lengths[0]
    rest = torch.tensor([cont_ids[:-1]])
    m = rest.shape[1]
    out = model(input_ids=rest, **cache_kwargs(model, dc, torch.arange(n_ctx, n_ctx + m),
                                               cache_position=torch.arange(kept, kept + m)))
    logits = torch.cat([first_logits[None].float(), out.logits[0].float()])
    logp = torch.log_softmax(logits, dim=-1)
    return float(logp.gather(1, torch.tensor(cont_ids)[:, None]).sum())


def test_full_cache_loglikelihood_equals_hf_forward(lm, ref_model):
    bridge = KVBenchLM(lm=lm, method="full")
    ctx, cont = text(120, 1), " apple river stone cloud"
    (ll, greedy), = bridge.loglikelihood([ll_request(ctx, cont)])
    ref_ll, ref_greedy = hf_full_loglikelihood(ref_model, *encode_pair(lm.tokenizer, ctx, cont))
    assert abs(ll - ref_ll) < 1e-4
    assert greedy == ref_greedy
    # is_greedy is true exactly when every continuation token is the argmax: score the model's own greedy token
    ctx_ids = lm.tokenizer(ctx, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        top = int(ref_model(input_ids=torch.tensor([ctx_ids])).logits[0, -1].argmax())
    (_, g2), = bridge._loglikelihood_tokens([(None, ctx_ids, [top])])
    assert g2 is True


def test_empty_context_uses_prefix_token(lm, ref_model):
    bridge = KVBenchLM(lm=lm, method="full")
    (ll, _), = bridge.loglikelihood([ll_request("", " river stone")])
    cont_ids = lm.tokenizer(" river stone", add_special_tokens=False)["input_ids"]
    ref_ll, _ = hf_full_loglikelihood(ref_model, [bridge.prefix_token_id], cont_ids)
    assert abs(ll - ref_ll) < 1e-4


def test_snapkv_loglikelihood_reads_the_compressed_cache(lm, ref_model):
    full = KVBenchLM(lm=lm, method="full")
    snap = KVBenchLM(lm=lm, method="snapkv", budget=24, window_size=8)
    ctx, cont = text(150, 2), " green quiet seven table market"
    ll_full, _ = full.loglikelihood([ll_request(ctx, cont)])[0]
    ll_snap, _ = snap.loglikelihood([ll_request(ctx, cont)])[0]
    assert abs(ll_full - ll_snap) > 1e-3  # compression changes the score

    # slow reference: the engine prefills+compresses, the HF model scores the continuation on the kept KV
    ctx_ids, cont_ids = encode_pair(lm.tokenizer, ctx, cont)
    engine = Engine(lm, None)
    cache, _, first = prefill_context(engine, ctx_ids, build_method("snapkv", budget=24, window_size=8))
    assert cache.kv[0].head_lengths == [24, 24] and cache.seen_tokens == len(ctx_ids) > 100
    ref = hf_on_compressed(ref_model, cache, first, len(ctx_ids), cont_ids)
    assert abs(ll_snap - ref) < 1e-4


def test_shared_context_is_compressed_once_and_reused(lm, monkeypatch):
    from kvbench.methods.snapkv import SnapKV
    calls = []
    orig = SnapKV.compress_layer
    monkeypatch.setattr(SnapKV, "compress_layer", lambda self, c: (calls.append(c.layer_idx), orig(self, c))[1])
    snap = KVBenchLM(lm=lm, method="snapkv", budget=24, window_size=8)
    reqs = [ll_request(text(100, 3), c) for c in (" apple", " river stone", " apple")]
    lls = snap.loglikelihood(reqs)
    assert calls == list(range(lm.model.config.num_hidden_layers))  # one compression for the three choices
    assert lls[0] == lls[2]  # a request does not modify the shared compressed cache
    alone = KVBenchLM(lm=lm, method="snapkv", budget=24, window_size=8).loglikelihood(reqs[1:2])
    assert abs(alone[0][0] - lls[1][0]) < 1e-6


def test_split_last_line_compresses_before_the_question(lm, ref_model):
    """The first continuation token is predicted by the prefill's exact attention, so a one-token answer
    scores the same under SnapKV; split_last_line feeds the question line on top of the compressed context."""
    ctx, cont = text(150, 5) + "\nAnswer:", " apple"
    cont_ids = lm.tokenizer(cont, add_special_tokens=False)["input_ids"]
    assert len(cont_ids) == 1
    full = KVBenchLM(lm=lm, method="full").loglikelihood([ll_request(ctx, cont)])[0][0]
    kw = dict(method="snapkv", budget=24, window_size=8)
    plain = KVBenchLM(lm=lm, **kw).loglikelihood([ll_request(ctx, cont)])[0][0]
    split = KVBenchLM(lm=lm, split_last_line=True, **kw).loglikelihood([ll_request(ctx, cont)])[0][0]
    assert abs(plain - full) < 1e-4 and abs(split - full) > 1e-3
    # reference: engine compresses the text before the last line; HF runs "\nAnswer:" on the kept KV
    before = lm.tokenizer(ctx[: ctx.rindex("\n")], add_special_tokens=False)["input_ids"]
    question = lm.tokenizer("\nAnswer:", add_special_tokens=False)["input_ids"]
    cache, _, _ = prefill_context(Engine(lm, None), before, build_method("snapkv", budget=24, window_size=8))
    dc = DynamicCache()
    for i, layer in enumerate(cache.kv):
        k, v, _ = layer.dense()
        dc.update(k[None], v[None], i)
    n, q = len(before), len(question)
    with torch.no_grad():
        logits = ref_model(input_ids=torch.tensor([question]),
                           **cache_kwargs(ref_model, dc, torch.arange(n, n + q),
                                          cache_position=torch.arange(24, 24 + q))).logits
    ref = float(torch.log_softmax(logits[0, -1].float(), -1)[cont_ids[0]])
    assert abs(split - ref) < 1e-4
    # generation with the same split equals Engine.run_sample with query_aware=false
    engine = Engine(lm, build_method("snapkv", budget=24, window_size=8), query_aware=False)
    sample = Sample(id="s", context=ctx[: ctx.rindex("\n")], chat_template=False,
                    queries=[Query(question="\nAnswer:", answers=[], max_new_tokens=10)])
    expected = engine.run_sample(sample)[0]["prediction"]
    got = KVBenchLM(lm=lm, split_last_line=True, **kw).generate_until(
        [Instance("generate_until", {}, (ctx, {"until": [], "max_gen_toks": 10}), 0)])
    assert got == [expected]


@torch.no_grad()
def hf_masked_loglikelihood(model, ids, mask):
    """Sum of log p(ids[t+1] | ids[..t]) with a boolean (n-1, n-1) attention mask (eager attention)."""
    bias = torch.where(mask, 0.0, float("-inf"))[None, None]
    logits = model(input_ids=torch.tensor([ids[:-1]]), attention_mask=bias).logits[0].float()
    return float(torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None]).sum())


def test_loglikelihood_rolling(lm, ref_model):
    doc = text(80, 7)
    req = [Instance("loglikelihood_rolling", {}, (doc,), 0)]
    toks = lm.tokenizer(doc, add_special_tokens=False)["input_ids"]
    bridge = KVBenchLM(lm=lm, method="full")
    ids = [bridge.prefix_token_id] + toks
    eager = copy.deepcopy(ref_model)
    eager.set_attn_implementation("eager")
    i, j = torch.arange(len(ids) - 1)[:, None], torch.arange(len(ids) - 1)[None]
    assert bridge.loglikelihood_rolling(req)[0] == pytest.approx(hf_masked_loglikelihood(eager, ids, j <= i), abs=1e-3)
    # windows predicting 32 tokens each; a window sees at most 32 tokens, so a full window is conditioned on
    # the token before it only and the last, shorter one on as many earlier tokens as fit (lm-eval's rolling)
    small = KVBenchLM(lm=dataclasses.replace(lm, max_context=32), method="full")
    ref = 0.0
    for start in range(0, len(toks), 32):
        end = min(start + 32, len(toks))
        prev = [bridge.prefix_token_id] if start == 0 else toks[end - 33:start]
        ref += hf_full_loglikelihood(ref_model, prev, toks[start:start + 32])[0]
    assert len(toks) > 64 and small.loglikelihood_rolling(req)[0] == pytest.approx(ref, abs=1e-3)
    # StreamingLLM evicts while the document streams through: each token sees the 4 sinks and the
    # budget - 4 most recent cached tokens plus itself (the cache holds `budget` tokens between steps)
    stream = KVBenchLM(lm=lm, method="streaming_llm", budget=16, n_sink=4).loglikelihood_rolling(req)[0]
    sink_recent = (j <= i) & ((j < 4) | (j > i - 13))
    assert stream == pytest.approx(hf_masked_loglikelihood(eager, ids, sink_recent), abs=1e-3)
    assert abs(stream - bridge.loglikelihood_rolling(req)[0]) > 1e-3


def test_generate_until_matches_run_sample(lm):
    method = build_method("snapkv", budget=24, window_size=8)
    bridge = KVBenchLM(lm=lm, method="snapkv", budget=24, window_size=8)
    prompt = text(100, 4) + "\nAnswer:"
    engine = Engine(lm, method, query_aware=True)
    sample = Sample(id="s", context=prompt, queries=[Query(question="", answers=[], max_new_tokens=12)],
                    chat_template=False)
    expected = engine.run_sample(sample)[0]["prediction"]
    got = bridge.generate_until([Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 12}), 0)])
    assert got == [expected] and len(expected) > 0
    # a stop string cuts the text at its first occurrence (and stops decoding there)
    stop = expected[len(expected) // 2: len(expected) // 2 + 3]
    cut = bridge.generate_until([Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 12}), 0)])
    assert cut == [expected.split(stop)[0]] and len(cut[0]) < len(expected)
    with pytest.raises(ValueError, match="do_sample"):
        bridge.generate_until([Instance("generate_until", {}, (prompt, {"do_sample": True}), 0)])


def test_register_and_model_args():
    from lm_eval.api.registry import get_model
    assert register() is KVBenchLM and register() is KVBenchLM  # idempotent
    cls = get_model("kvbench")
    assert cls is KVBenchLM and get_model("hf") is not None  # lm-eval's own models still there
    m = cls.create_from_arg_string("model=synthetic,shape=tiny,method=snapkv,budget=32,window_size=8",
                                   {"batch_size": 1, "device": "cpu"})
    assert m.method.budget == 32 and m.method.window_size == 8 and m.max_length == 8192
    with pytest.raises(ValueError, match="method="):
        cls.create_from_arg_string("model=synthetic,shape=tiny,method=nope", {"device": "cpu"})
    with pytest.raises(ValueError, match="not a knob"):
        cls.create_from_arg_string("model=synthetic,shape=tiny,method=snapkv,budget=8,bogus=1", {"device": "cpu"})


# -- lm-eval's evaluator and the task=lm_eval path, on local custom tasks ------------------------------
def write_tasks(tmp_path, qa_rows, mc_rows):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa_rows))
    (data / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc_rows))
    (tmp_path / "kvb_qa.yaml").write_text(f"""task: kvb_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data / 'qa.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{passage}}}}\\nQuestion: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
""")
    (tmp_path / "kvb_mc.yaml").write_text(f"""task: kvb_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{passage}}}}\\nQuestion: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")


def qa_rows(answers):
    return [{"passage": text(60, 10 + i), "question": f"What is item {i}?", "answer": a} for i, a in enumerate(answers)]


def mc_rows():
    return [{"passage": text(60, 20 + i), "question": "Which word?", "choices": ["apple", "river", "stone"],
             "label": i % 3} for i in range(3)]


def test_lm_eval_simple_evaluate_multiple_choice_and_generation(lm, ref_model, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager
    write_tasks(tmp_path, qa_rows(["x", "y"]), mc_rows())
    bridge = KVBenchLM(lm=lm, method="full")
    res = lm_eval.simple_evaluate(model=bridge, tasks=["kvb_mc", "kvb_qa"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    # multiple choice: acc from an independent argmax over HF full-forward log-likelihoods
    correct = []
    for r in mc_rows():
        ctx = f"{r['passage']}\nQuestion: {r['question']}\nAnswer:"
        lls = [hf_full_loglikelihood(ref_model, *encode_pair(lm.tokenizer, ctx, " " + c))[0] for c in r["choices"]]
        correct.append(float(max(range(3), key=lambda j: lls[j]) == r["label"]))
    assert res["results"]["kvb_mc"]["acc,none"] == pytest.approx(sum(correct) / 3)
    # generation: lm-eval's responses are the bridge's own generate_until outputs
    for s in res["samples"]["kvb_qa"]:
        ctx, gen_kwargs = s["arguments"][0]
        assert gen_kwargs["max_gen_toks"] == 6 and ctx.endswith(f"{s['doc']['question']}\nAnswer:")
        assert s["resps"][0][0] == bridge.generate_until([Instance("generate_until", {}, (ctx, gen_kwargs), 0)])[0]
        assert s["exact_match"] == float(s["filtered_resps"][0].lower() == s["target"].lower())


def test_task_lm_eval_runs_end_to_end(lm, tmp_path):
    """kvbench run task=lm_eval on a local custom task: scored by lm-eval's process_results (exact match,
    ignore_case). The first doc's answer is set to the prediction of a first run, so the second run must
    score it 1 and the other doc 0."""
    from kvbench import runner
    write_tasks(tmp_path, qa_rows(["zzz-never", "zzz-never"]), mc_rows())
    cfg = {"model": {"name": "synthetic", "shape": "tiny"}, "device": "cpu", "dtype": "float32",
           "method": {"name": "snapkv", "window_size": 8, "kernel_size": 7, "pooling": "max"}, "budget": 24,
           "task": {"name": "lm_eval", "names": ["kvb_qa"], "include_path": str(tmp_path),
                    "include_defaults": False, "num_samples": None},
           "results_dir": str(tmp_path / "results"), "sweep": "t", "seed": 0}
    s1 = runner.execute(cfg)
    assert s1["status"] == "ok", s1
    recs = [json.loads(x) for x in open(f"{s1['_dir']}/records.jsonl")]
    assert [r["score"] for r in recs] == [0.0, 0.0] and all(r["status"] == "ok" for r in recs)
    assert all(r["new_tokens"] <= 6 and r["context_tokens"] > 50 for r in recs)
    pred = recs[0]["prediction"].split("\n")[0]
    assert pred.strip()
    write_tasks(tmp_path, qa_rows([pred.upper(), "zzz-never"]), mc_rows())  # ignore_case: upper still matches
    s2 = runner.execute({**cfg, "force": True})
    recs2 = [json.loads(x) for x in open(f"{s2['_dir']}/records.jsonl")]
    assert [r["prediction"] for r in recs2] == [r["prediction"] for r in recs]  # greedy: same generations
    assert [r["score"] for r in recs2] == [1.0, 0.0]
    assert s2["extra"]["lm_eval/kvb_qa/exact_match,none"] == pytest.approx(0.5)
    assert s2["extra"]["score/kvb_qa"] == pytest.approx(0.5)


def test_task_lm_eval_bad_input(tmp_path):
    from kvbench.tasks.lm_eval import LMEvalTask, split_prompt
    assert split_prompt("Ctx line\nQuestion: q\nAnswer:") == ("Ctx line\nQuestion: q", "\nAnswer:")
    assert split_prompt("one line answer") == ("one line", " answer")
    with pytest.raises(ValueError, match="task.names"):
        LMEvalTask(names=[])
    write_tasks(tmp_path, qa_rows(["a"]), mc_rows())
    with pytest.raises(ValueError, match="output_type='multiple_choice'"):
        LMEvalTask(names=["kvb_mc"], include_path=str(tmp_path), include_defaults=False).lm_eval_tasks()
    with pytest.raises(ValueError, match="not found"):
        LMEvalTask(names=["nope"], include_path=str(tmp_path), include_defaults=False).lm_eval_tasks()
    with pytest.raises(ValueError, match="task.metric='bleu'"):
        LMEvalTask(names=["kvb_qa"], include_path=str(tmp_path), include_defaults=False,
                   metric="bleu").lm_eval_tasks()
