"""The experiments' synthetic data: facts about made-up people, and the SFT demo's repeat task.

Names are three syllables drawn from a fixed list, so the BPE the run trains sees each name
often enough to give it a token or two, and nothing in this interpreter's library mentions them.
Everything is a function of the seed given, so every model of a comparison sees the same data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from experiments.stack import write_jsonl

SYLLABLES = ("ka", "lo", "mi", "ver", "ta", "su", "ron", "bel", "di", "fa", "gor", "hin", "jus", "ke",
             "ly", "mo", "nes", "pa", "qui", "rak", "sel", "tor", "um", "vy", "wen", "xa", "yor", "zu")
LETTERS = "abcdefgh"


def made_up_names(count: int, rng: random.Random) -> list[str]:
    names: set[str] = set()
    while len(names) < count:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize())
    ordered = sorted(names)
    rng.shuffle(ordered)
    return ordered


def parent_fact(child: str, parent: str) -> str:
    return f"The parent of {child} is {parent}."


def child_fact(parent: str, child: str) -> str:
    return f"The child of {parent} is {child}."


@dataclass
class ReversalData:
    """(child, parent) pairs: `one_way` stated only as parent facts, `both_ways` as both, and
    `heldout` (both ways) only in the held-out file the run's validation reads."""
    one_way: list[tuple[str, str]]
    both_ways: list[tuple[str, str]]
    heldout: list[tuple[str, str]]


def write_reversal_corpus(out: Path, *, one_way: int, both_ways: int, files: int = 10,
                          seed: int = 0) -> ReversalData:
    """JSONL files of one fact per line in `out`: `files - 1` training files, then one held-out
    file, last, so that `data.heldout_fraction: 1 / files` holds out exactly that one (the run
    holds out every k-th file)."""
    rng = random.Random(seed)
    heldout_pairs = max(4, both_ways // 10)
    names = made_up_names(2 * (one_way + both_ways + heldout_pairs), rng)
    pairs = [(names[2 * i], names[2 * i + 1]) for i in range(len(names) // 2)]
    data = ReversalData(pairs[:one_way], pairs[one_way:one_way + both_ways], pairs[one_way + both_ways:])
    facts = [parent_fact(c, p) for c, p in data.one_way]
    facts += [fact for c, p in data.both_ways for fact in (parent_fact(c, p), child_fact(p, c))]
    rng.shuffle(facts)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(files - 1):
        _write_texts(out / f"facts_{i:02d}.jsonl", facts[i::files - 1])
    _write_texts(out / f"facts_{files - 1:02d}.jsonl",
                 [fact for c, p in data.heldout for fact in (parent_fact(c, p), child_fact(p, c))])
    return data


def reversal_questions(data: ReversalData) -> dict[str, list[dict]]:
    """Generation rows per question set: forward ("The parent of X is" -> the parent) and
    reversed ("The child of Y is" -> the child), on the one-way pairs (the test) and the both-ways
    pairs (the format, learnt). Every name follows a space, so it is the same tokens wherever it
    stands."""
    return {
        "one_way_forward": [{"prompt": f"The parent of {c} is", "answer": p} for c, p in data.one_way],
        "one_way_reversed": [{"prompt": f"The child of {p} is", "answer": c} for c, p in data.one_way],
        "both_ways_forward": [{"prompt": f"The parent of {c} is", "answer": p} for c, p in data.both_ways],
        "both_ways_reversed": [{"prompt": f"The child of {p} is", "answer": c} for c, p in data.both_ways],
    }


def reversal_choices(data: ReversalData, seed: int = 0) -> dict[str, list[dict]]:
    """Four-way multiple-choice rows on the one-way pairs: the right name against three others of
    the same role, forward and reversed. Every name is one token of the run's BPE, so Algorithm 3
    with one Monte Carlo sample is the exact log-likelihood, as the ARM's score is."""
    rng = random.Random(seed)
    parents, children = [p for _, p in data.one_way], [c for c, _ in data.one_way]

    def row(context: str, answer: str, pool: list[str]) -> dict:
        choices = [answer, *rng.sample([name for name in pool if name != answer], 3)]
        rng.shuffle(choices)
        return {"context": context, "choices": [f" {c}" for c in choices], "answer": choices.index(answer)}

    return {"one_way_forward_choice": [row(f"The parent of {c} is", p, parents) for c, p in data.one_way],
            "one_way_reversed_choice": [row(f"The child of {p} is", c, children) for c, p in data.one_way]}


def repeat_conversation(letters: tuple[str, ...]) -> dict:
    text = " ".join(letters)
    return {"messages": [{"role": "user", "content": f"Repeat: {text}"}, {"role": "assistant", "content": text}]}


def write_repeat_task(out: Path, *, conversations: int, heldout: int, max_letters: int,
                      seed: int = 0) -> None:
    """The SFT demo's task with answers of every length from 1 to `max_letters` letters:
    train.jsonl and heldout.jsonl (conversations), corpus.txt (the text the tokenizer is trained
    on) and questions.jsonl (the held-out prompts as generation rows)."""
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()
    while len(seen) < conversations + heldout:
        seen.add(tuple(rng.choice(LETTERS) for _ in range(rng.randint(1, max_letters))))
    rows = sorted(seen)
    rng.shuffle(rows)
    test, train = rows[:heldout], rows[heldout:]
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", [repeat_conversation(t) for t in train])
    write_jsonl(out / "heldout.jsonl", [repeat_conversation(t) for t in test])
    (out / "corpus.txt").write_text("\n".join(f"Repeat: {' '.join(t)}\n{' '.join(t)}" for t in train) + "\n")
    write_jsonl(out / "questions.jsonl", [{"prompt": f"Repeat: {' '.join(t)}", "answer": " ".join(t)} for t in test])


def _write_texts(path: Path, texts: list[str]) -> None:
    write_jsonl(path, [{"text": text} for text in texts])
