"""Retrieval-augmented generation over the bundled plays (or any text folder).

`python -m experiments.rag --query "..." [--run runs/shakespeare] [--k 5] [--retriever bm25|embed]`
prints the retrieved passages with scores, the passages that fit the prompt, and the answer.
`--eval`: recall@1/5 of BM25 and embeddings on generated questions (a line fragment -> the
passages holding it). `--reuse`: time to first token of repeated-document questions with and
without the engine's prefix cache. Both write benchmarks/results/rag-<section>_<device>_<date>
.json and .png. Without --run the model is random (retrieval by BM25 still works).
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
from llmjax.models import init_model  # noqa: E402
from llmjax.rag import RETRIEVERS, RagError, RagPipeline, load_passages, make_retriever  # noqa: E402
from llmjax.rag import fragment_questions, recall_at_k  # noqa: E402
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


def print_answer(answer, passages):
    for passage, score in answer.hits:
        mark = "*" if passage.id in answer.used else " "
        print(f"{mark} [{passage.id} {passage.title}] score {score:.3f}\n    "
              + passage.text.replace("\n", "\n    "))
    print(f"(* in the prompt: {answer.prompt_tokens} tokens, {answer.cached_tokens} from the prefix cache; "
          f"first token after {answer.ttft_s * 1e3:.1f} ms)\nanswer: {answer.text}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.rag", description=__doc__)
    parser.add_argument("--query", help="the question")
    parser.add_argument("--run", help="trained run folder (default: a random gpt2-tiny)")
    parser.add_argument("--corpus", default="shakespeare", help="bundled name, or a .txt/.md file or folder")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--retriever", choices=RETRIEVERS, default="bm25")
    parser.add_argument("--max-words", type=int, default=32, help="passage size in words")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--eval", action="store_true", help="recall@k of both retrievers")
    parser.add_argument("--questions", type=int, default=200, help="generated questions for --eval")
    parser.add_argument("--reuse", action="store_true", help="TTFT with and without document KV reuse")
    args = parser.parse_args(argv)
    if not (args.query or args.eval or args.reuse):
        parser.error("give --query, --eval or --reuse")
    try:
        passages = load_passages(args.corpus, args.max_words)
        model, tokenizer = load_model(args.run)
        if args.eval:
            print(write_results("recall", evaluate(passages, model, tokenizer, args.questions, args.run),
                                plot_recall))
        if args.reuse:
            from llmjax.rag.reuse import plot_reuse, reuse_trace

            print(write_results("reuse", reuse_trace(passages, model, tokenizer), plot_reuse))
        if args.query:
            retrieve = make_retriever(args.retriever, passages, model, tokenizer)
            engine = Engine(model, EngineConfig(max_slots=1, prefill_slots=1, chunk_size=64))
            pipeline = RagPipeline(passages, tokenizer, engine, retrieve, max_new_tokens=args.max_new_tokens)
            print_answer(pipeline.answer(args.query, args.k), passages)
    except (RagError, CorpusError, CheckpointError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
