"""Retrieval-augmented generation over the bundled plays (or any text folder).

`python -m experiments.rag --query "..." [--run runs/shakespeare] [--k 5] [--retriever bm25|embed]`
prints the retrieved passages with scores, the passages that fit the prompt, and the answer.
`--eval`: recall@1/5 of BM25 and embeddings on generated questions (a line fragment -> the
passages holding it). `--reuse`: time to first token of repeated-document questions with and
without the engine's prefix cache. `--kv`: KV bytes per token vs perplexity on the corpus's
validation windows for model-dtype, bf16, int8 and fp8 KV (`--kv-dtypes` picks), engine
decode tokens/s for each (wall-clock median), int8 against bf16, and a stored int8 KV's load
time vs its prefill. Each writes benchmarks/results/rag-<section>_<device>_<date>.json and
.png. Without --run the model is random (BM25 retrieval still works).
"""
import argparse
import json
import pathlib
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from llmjax.checkpoint import CheckpointError  # noqa: E402
from llmjax.config import load_config  # noqa: E402
from llmjax.data import CorpusError, load_tokenizer  # noqa: E402
from llmjax.decode.engine import Engine, EngineConfig  # noqa: E402
from llmjax.decode.paged import KV_DTYPES  # noqa: E402
from llmjax.models import init_model  # noqa: E402
from llmjax.rag import (  # noqa: E402
    RETRIEVERS,
    DenseIndex,
    RagError,
    RagPipeline,
    embed_texts,
    fragment_questions,
    load_passages,
    make_retriever,  # noqa: E402
    recall_at_k,
)
from llmjax.runs import load_run  # noqa: E402
from pallas_kernels import _bench  # noqa: E402

RESULTS = pathlib.Path("benchmarks/results")


def load_model(run):
    """(model, tokenizer): a trained run's, or a random gpt2-tiny with the bundled tokenizer."""
    if run:
        _, model, tokenizer = load_run(run)
        return model, tokenizer
    return init_model(load_config(overrides=["preset=gpt2-tiny", "model.vocab_size=8192"]).model, seed=0), load_tokenizer("bundled")


def write_results(section: str, rows: list, plot) -> pathlib.Path:
    """rows (each with the environment fields) to JSON and `plot(ax, rows)` to PNG."""
    env = _bench.environment()
    rows = [dict(env, section=section, **row) for row in rows]
    stem = f"rag-{section}_{re.sub(r'[^a-z0-9]+', '_', env['device'].lower())}_{env['date']}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{stem}.json"
    path.write_text(json.dumps(rows, indent=1))
    fig, ax = plt.subplots(figsize=(6, 4))
    plot(ax, rows)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=120)
    plt.close(fig)
    return path


def evaluate(passages, model, tokenizer, n_questions: int, run) -> list:
    """Recall@1 and @5 of each retriever on generated fragment questions."""
    questions = fragment_questions(passages, n_questions)
    rows = []
    for kind in RETRIEVERS:
        retrieve = make_retriever(kind, passages, model, tokenizer)
        rows.append(dict(retriever=kind, model=run or "random gpt2-tiny", passages=len(passages),
                         questions=len(questions), **{f"recall@{k}": recall_at_k(retrieve, questions, k)
                                                      for k in (1, 5)}))
        print(f"{kind:6s} recall@1 {rows[-1]['recall@1']:.3f}  recall@5 {rows[-1]['recall@5']:.3f}")
    return rows


def plot_recall(ax, rows):
    for i, k in enumerate((1, 5)):
        ax.bar([j + 0.4 * i for j in range(len(rows))], [r[f"recall@{k}"] for r in rows], 0.4,
               label=f"recall@{k}")
    ax.set_xticks([j + 0.2 for j in range(len(rows))], [r["retriever"] for r in rows])
    ax.set_ylim(0, 1)
    ax.set_title(f"{rows[0]['questions']} fragment questions, {rows[0]['passages']} passages")
    ax.legend()


def _int8_vs_bf16(bf16: dict, int8: dict, head_dim: int) -> dict:
    """The issue-15 acceptance row: int8 KV's bytes, perplexity and decode speed against bf16's."""
    row = dict(kv_dtype="int8", section_part="int8_vs_bf16", head_dim=head_dim,
               bytes_ratio=int8["kv_bytes_per_token"] / bf16["kv_bytes_per_token"],
               ppl_change=int8["perplexity"] / bf16["perplexity"] - 1,
               decode_speedup=int8["tokens_per_s"] / bf16["tokens_per_s"])
    print(f"int8 vs bf16 KV (head_dim {head_dim}): bytes x{row['bytes_ratio']:.3f}, ppl {row['ppl_change']:+.3%}, "
          f"decode {int8['tokens_per_s']:.0f} vs {bf16['tokens_per_s']:.0f} tok/s (x{row['decode_speedup']:.2f})",
          flush=True)
    return row


def kv_rows(model, run, n_windows: int, reps: int = 3, kv_dtypes=None) -> list:
    """Bytes/token, perplexity (and change vs the first KV dtype, default model-dtype KV) and
    engine decode tokens/s (wall-clock median of `reps`) per KV dtype (default all); int8
    against bf16 on all three where both ran; then stored-KV load vs prefill for one
    full-context document."""
    from llmjax.data import load_dataset
    from llmjax.rag.kv_store import engine_decode_rate, kv_perplexity, load_vs_prefill

    cfg = load_run(run)[0].data if run else None
    data = (load_dataset(cfg.corpus, cfg.tokenizer, cfg.seq_len, cfg.val_fraction) if cfg
            else load_dataset("shakespeare", "bundled", 64, 0.05))
    windows, rows = data.val[:n_windows], []
    for kv_dtype in kv_dtypes or KV_DTYPES:
        rows.append(dict(kv_dtype=kv_dtype, model=run or "random gpt2-tiny", windows=len(windows),
                         head_dim=model.cfg.head_dim, perplexity=kv_perplexity(model, windows, kv_dtype=kv_dtype),
                         **engine_decode_rate(model, kv_dtype, reps=reps)))
        rows[-1]["ppl_change"] = rows[-1]["perplexity"] / rows[0]["perplexity"] - 1
        print(f"KV {kv_dtype:9s} {rows[-1]['kv_bytes_per_token']:8.0f} B/token  ppl {rows[-1]['perplexity']:.4f} "
              f"({rows[-1]['ppl_change']:+.3%})  decode {rows[-1]['tokens_per_s']:.0f} tok/s", flush=True)
    by_dtype = {r["kv_dtype"]: r for r in rows}
    if {"bfloat16", "int8"} <= set(by_dtype):
        rows.append(_int8_vs_bf16(by_dtype["bfloat16"], by_dtype["int8"], model.cfg.head_dim))
    load = load_vs_prefill(model, windows[0, :-1])
    rows.append(dict(kv_dtype="int8", section_part="load_vs_prefill", **load,
                     speedup=load["prefill_s"] / load["load_s"]))
    print(f"stored int8 KV of {load['tokens']} tokens ({load['kv_bytes']} B): load {load['load_s'] * 1e3:.3f} ms, "
          f"prefill {load['prefill_s'] * 1e3:.3f} ms ({rows[-1]['speedup']:.1f}x)")
    return rows


def plot_kv(ax, rows):
    rows = [r for r in rows if "perplexity" in r]
    ax.scatter([r["kv_bytes_per_token"] for r in rows], [r["ppl_change"] * 100 for r in rows])
    for r in rows:
        ax.annotate(r["kv_dtype"], (r["kv_bytes_per_token"], r["ppl_change"] * 100))
    ax.set_xlabel("KV bytes per token (all layers)")
    ax.set_ylabel(f"perplexity change vs {rows[0]['kv_dtype']} KV (%)")


def print_answer(answer):
    for passage, score in answer.hits:
        mark = "*" if passage.id in answer.used else " "
        print(f"{mark} [{passage.id} {passage.title}] score {score:.3f}\n    "
              + passage.text.replace("\n", "\n    "))
    print(f"(* in the prompt: {answer.prompt_tokens} tokens, {answer.cached_tokens} from the prefix cache; "
          f"first token after {answer.ttft_s * 1e3:.1f} ms, compilation included)\nanswer: {answer.text}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.rag", description=__doc__)
    parser.add_argument("--query", help="the question")
    parser.add_argument("--run", help="trained run folder (default: a random gpt2-tiny)")
    parser.add_argument("--corpus", default="shakespeare", help="bundled name, or a .txt/.md file or folder")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--retriever", choices=RETRIEVERS, default="bm25")
    parser.add_argument("--max-words", type=int, default=32, help="passage size in words")
    parser.add_argument("--index", help="dense index (.npz) to read for --retriever embed")
    parser.add_argument("--save-index", help="write the dense index built for --retriever embed here")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--eval", action="store_true", help="recall@k of both retrievers")
    parser.add_argument("--questions", type=int, default=200, help="generated questions for --eval")
    parser.add_argument("--reuse", action="store_true", help="TTFT with and without document KV reuse")
    parser.add_argument("--kv", action="store_true", help="KV compression: bytes/token vs perplexity, load vs prefill")
    parser.add_argument("--windows", type=int, default=64, help="validation windows for --kv")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per decode-speed median for --kv")
    parser.add_argument("--kv-dtypes", nargs="+", choices=KV_DTYPES, help="KV dtypes for --kv (default all)")
    args = parser.parse_args(argv)
    if not (args.query or args.eval or args.reuse or args.kv):
        parser.error("give --query, --eval, --reuse or --kv")
    small = [f"--{name.replace('_', '-')} {getattr(args, name)}"
             for name in ("k", "max_words", "max_new_tokens", "questions", "windows", "reps") if getattr(args, name) < 1]
    if small:
        parser.error(f"{', '.join(small)}: counts must be >= 1")
    try:
        passages = load_passages(args.corpus, args.max_words)
        model, tokenizer = load_model(args.run)
        if args.eval:
            print(write_results("recall", evaluate(passages, model, tokenizer, args.questions, args.run),
                                plot_recall))
        if args.reuse:
            from llmjax.rag.reuse import plot_reuse, reuse_trace

            print(write_results("reuse", reuse_trace(passages, model, tokenizer), plot_reuse))
        if args.kv:
            print(write_results("kv", kv_rows(model, args.run, args.windows, args.reps, args.kv_dtypes), plot_kv))
        if args.query:
            index = DenseIndex.load(args.index) if args.index else None
            if args.save_index:
                index = index or DenseIndex(embed_texts(model, tokenizer, [p.text for p in passages]))
                index.save(args.save_index)
            retrieve = make_retriever(args.retriever, passages, model, tokenizer, index)
            engine = Engine(model, EngineConfig(max_slots=1, prefill_slots=1, chunk_size=64))
            pipeline = RagPipeline(passages, tokenizer, engine, retrieve, max_new_tokens=args.max_new_tokens)
            print_answer(pipeline.answer(args.query, args.k))
    except (RagError, CorpusError, CheckpointError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
