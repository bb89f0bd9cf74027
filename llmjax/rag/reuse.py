"""Document KV reuse measured: time to first token (TTFT) of questions over repeated
documents, served by the engine with and without its prefix cache.

The trace: `groups` sets of retrieved passages (consecutive passages of one play), each asked
`repeats` different questions, one request at a time. With the prefix cache, a question after
the first of its group finds its passages' KV blocks cached (the prompt starts with the
passages in canonical order) and prefills only the rest: the question and the tail block.
"""
import statistics

import numpy as np

from llmjax.decode.engine import Engine, EngineConfig
from llmjax.rag.pipeline import assemble_prompt, fragment_questions


def reuse_trace(passages, model, tokenizer, *, groups: int = 4, repeats: int = 4, per_group: int = 3,
                max_new_tokens: int = 8, engine_cfg: EngineConfig | None = None, seed: int = 0) -> list:
    """Serve the trace with prefix caching on and off; one row per setting: mean/median TTFT
    (ms), TTFT of first and of repeated questions, prompt tokens and tokens prefilled, and
    whether both settings generated the same tokens."""
    engine_cfg = engine_cfg or EngineConfig(max_slots=1, prefill_slots=1, chunk_size=32, block_size=8,
                                            num_blocks=64)
    rng = np.random.default_rng(seed)
    starts = rng.choice(len(passages) - per_group, size=groups, replace=False)
    trace = []
    for start in starts:
        ids = list(range(int(start), int(start) + per_group))
        questions = fragment_questions([passages[i] for i in ids], repeats, words=4, seed=int(start))
        trace += [(ids, question) for question, _ in questions]
    rows, outputs = [], {}
    for caching in (False, True):
        engine = Engine(model, EngineConfig(**{**engine_cfg.__dict__, "prefix_caching": caching}))
        budget = engine.context - max_new_tokens
        engine.submit([1] * 8 + [2] * 40, 2)  # compile both step shapes outside the timing
        engine.run()
        ttft, first, prefilled, prompt_tokens, generated = [], [], 0, 0, []
        seen = set()
        for ids, question in trace:
            tokens, _ = assemble_prompt(tokenizer, passages, ids, question, budget)
            request = engine.submit(tokens, max_new_tokens)
            seq = engine.run()[request]
            ttft.append((seq.first_token_time - seq.arrival) * 1e3)
            first.append(tuple(ids) not in seen)
            seen.add(tuple(ids))
            prompt_tokens += len(tokens)
            prefilled += len(tokens) - seq.cached_tokens
            generated.append(seq.generated)
        outputs[caching] = generated
        repeat_ttft = [t for t, f in zip(ttft, first) if not f]
        rows.append(dict(prefix_caching=caching, requests=len(trace), mean_ttft_ms=statistics.mean(ttft),
                         median_ttft_ms=statistics.median(ttft),
                         first_question_ttft_ms=statistics.mean([t for t, f in zip(ttft, first) if f]),
                         repeat_question_ttft_ms=statistics.mean(repeat_ttft),
                         prompt_tokens=prompt_tokens, prefilled_tokens=prefilled))
    for row in rows:
        row["same_tokens"] = outputs[False] == outputs[True]
        print(f"prefix caching {str(row['prefix_caching']):5s}: TTFT mean {row['mean_ttft_ms']:.1f} ms "
              f"(repeats {row['repeat_question_ttft_ms']:.1f} ms), prefilled {row['prefilled_tokens']}"
              f"/{row['prompt_tokens']} tokens, same tokens: {row['same_tokens']}")
    return rows


def plot_reuse(ax, rows):
    """TTFT bars: first and repeated questions, caching off and on."""
    labels = ["first question", "repeated documents"]
    for i, row in enumerate(rows):
        ax.bar([j + 0.4 * i for j in range(2)],
               [row["first_question_ttft_ms"], row["repeat_question_ttft_ms"]], 0.4,
               label=f"prefix cache {'on' if row['prefix_caching'] else 'off'}")
    ax.set_xticks([0.2, 1.2], labels)
    ax.set_ylabel("time to first token (ms)")
    ax.legend()
