"""SFT data: the LLaDA chat template token by token, pair selection, EOS padding fed to Algorithm 2,
the overlong policy, JSONL errors naming file:line, and the resumable epoch iterator."""

from __future__ import annotations

import json
import math

import pytest
import torch

from data_pipeline.corpus import stdlib_root
from data_pipeline.sft import (
    ChatTemplate,
    SFTBatches,
    SFTCounts,
    SFTPair,
    SFTStream,
    choose_pairs,
    collate_sft,
    fit_to_length,
    load_sft_pairs,
    read_dialogues,
)
from data_pipeline.tokenizer import train_bpe
from pretrain.diffusion.objectives import sft_loss, sft_noise

VOCAB = 512
# abc.py is small and its BPE merges a lone "\n\n" into one token, so the tests can tell
# encode("\n\n" + content) from encode("\n\n") + encode(content).
TOKENIZER_SOURCE = "abc.py"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe([stdlib_root() / TOKENIZER_SOURCE], VOCAB, tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def template(tokenizer):
    return ChatTemplate(tokenizer)


def rendered(messages, generation_prompt: bool) -> str:
    """The released chat_template applied as a string (Jinja's `trim` is str.strip)."""
    text = "<|startoftext|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages)
    return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if generation_prompt else "")


def dialogue(*turns):
    return [{"role": role, "content": content} for role, content in turns]


def test_tokenizer_merges_a_lone_blank_line(tokenizer):
    """Precondition for the layout tests: without it they could not pin the segmentation."""
    assert len(tokenizer.encode("\n\n")) == 1
    assert tokenizer.encode("\n\nHello") != tokenizer.encode("\n\n") + tokenizer.encode("Hello")


def test_one_turn_layout_token_by_token(tokenizer, template):
    ids, enc = tokenizer.special_ids, tokenizer.encode
    pairs = template.pairs(dialogue(("user", "  What is abc?\n"), ("assistant", " An abstract base class. ")))
    assert len(pairs) == 1
    assert pairs[0].prompt == ([ids["bos"], ids["start_header"]] + enc("user") + [ids["end_header"]]
                               + enc("\n\nWhat is abc?") + [ids["eot"]]
                               + [ids["start_header"]] + enc("assistant") + [ids["end_header"]] + enc("\n\n"))
    assert pairs[0].response == enc("An abstract base class.") + [ids["eot"]]


def test_prompt_is_the_rendered_template_as_a_tokenizer_splits_it(tokenizer, template):
    """The prompt equals the HF-style tokenization of the rendered string (special tokens split it,
    each text piece is encoded alone), and prompt + response decodes to the full rendering."""
    messages = dialogue(("system", "Be brief."), ("user", "Define ABCMeta."), ("assistant", "A metaclass."))
    pair = template.pairs(messages)[0]
    assert pair.prompt == tokenizer.tokenizer.encode(rendered(messages[:2], True), add_special_tokens=False).ids
    assert tokenizer.decode(pair.prompt + pair.response) == rendered(messages, False)


def test_n_assistant_turns_give_n_pairs_with_all_earlier_turns(tokenizer, template):
    messages = dialogue(("system", "S."), ("user", "U1"), ("assistant", "A1"), ("user", "U2"),
                        ("assistant", "  A2 "), ("user", "U3"), ("assistant", "A3"))
    pairs = template.pairs(messages)
    assert len(pairs) == 3
    eot = tokenizer.special_ids["eot"]
    for pair, answer_at in zip(pairs, (2, 4, 6)):
        history = [tokenizer.special_ids["bos"]] + [i for m in messages[:answer_at] for i in template.message(m)]
        assert pair.prompt == history + template.generation_prompt()
        assert pair.response == tokenizer.encode(messages[answer_at]["content"].strip()) + [eot]
        assert tokenizer.decode(pair.prompt) == rendered(messages[:answer_at], True)


def test_one_pair_is_drawn_seeded_and_varies_all_keeps_all(template):
    pairs = template.pairs(dialogue(*[(role, f"{role} {k}") for k in range(4) for role in ("user", "assistant")]))
    assert len(pairs) == 4
    def drawn(index, epoch):
        chosen = choose_pairs(pairs, "one", 7, index, epoch)
        assert len(chosen) == 1
        return pairs.index(chosen[0])

    assert [drawn(index, 0) for index in range(8)] == [drawn(index, 0) for index in range(8)]
    assert len({drawn(index, 0) for index in range(8)}) > 1
    assert len({drawn(0, epoch) for epoch in range(8)}) > 1
    assert choose_pairs(pairs, "all", 7, 0, 0) == pairs
    with pytest.raises(ValueError, match="pairs must be one of"):
        choose_pairs(pairs, "some", 7, 0, 0)


def handmade_pairs():
    return [SFTPair([10, 11, 12], [20, 21, 5]), SFTPair([10, 11], [22, 5]), SFTPair([10, 11, 12, 13, 14], [23, 5])]


def test_collate_pads_with_eos_to_the_longest_row_or_a_fixed_width():
    eos = 1
    batch = collate_sft(handmade_pairs(), eos)
    assert batch.input_ids.dtype == batch.prompt_lengths.dtype == torch.long
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21, 5, 1],
                                        [10, 11, 22, 5, 1, 1, 1],
                                        [10, 11, 12, 13, 14, 23, 5]]
    assert batch.prompt_lengths.tolist() == [3, 2, 5]
    assert collate_sft(handmade_pairs(), eos, pad_to=9).input_ids[:, 7:].eq(eos).all()
    with pytest.raises(ValueError, match="shorter than the batch's longest row"):
        collate_sft(handmade_pairs(), eos, pad_to=6)


def test_noise_and_loss_keep_prompts_clean_and_train_padding_eos():
    batch = collate_sft(handmade_pairs(), eos_id=1)
    b, l = batch.input_ids.shape
    in_prompt = torch.arange(l)[None, :] < batch.prompt_lengths[:, None]
    padding = torch.tensor([[False] * 6 + [True], [False] * 4 + [True] * 3, [False] * 7])
    nb = sft_noise(batch.input_ids, batch.prompt_lengths, mask_id=2, t=torch.ones(b),
                   masked=torch.ones(b, l, dtype=torch.bool))
    assert torch.equal(nb.masked, ~in_prompt)
    assert nb.noisy[padding].eq(2).all() and torch.equal(nb.noisy[in_prompt], batch.input_ids[in_prompt])

    logits = torch.zeros(b, l, VOCAB, requires_grad=True)
    loss = sft_loss(logits, batch.input_ids, batch.prompt_lengths, nb)
    assert loss.item() == pytest.approx(math.log(VOCAB), rel=1e-6)  # every answer token masked, p_mask = 1
    loss.backward()
    touched = logits.grad.abs().sum(-1) > 0
    assert touched[padding].all() and not touched[in_prompt].any()


def test_truncate_and_drop_are_counted():
    pairs = [SFTPair([1] * 3, [2] * 3), SFTPair([1] * 4, [2] * 5), SFTPair([1] * 7, [2] * 2), SFTPair([1] * 8, [2])]
    kept, counts = fit_to_length(pairs, seq_len=8, overlong="truncate")
    assert [(len(p.prompt), len(p.response)) for p in kept] == [(3, 3), (4, 4), (7, 1)]
    assert (counts.truncated, counts.dropped) == (2, 1)
    kept, counts = fit_to_length(pairs, seq_len=8, overlong="drop")
    assert kept == pairs[:1] and (counts.truncated, counts.dropped) == (0, 3)
    with pytest.raises(ValueError, match="overlong must be one of"):
        fit_to_length(pairs, seq_len=8, overlong="clip")


GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"conversation": []}), 'a "messages" list'),
    (json.dumps({"messages": "hi"}), 'a "messages" list'),
    (json.dumps([1, 2]), 'a "messages" list'),
    (json.dumps({"messages": ["hi"]}), "message 0 is not an object"),
    (json.dumps({"messages": [{"role": "tool", "content": "x"}]}), "message 0 has role 'tool'"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}),
     r"message 1 \(assistant\) has content of type NoneType"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "no assistant message"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "chat.jsonl"
    path.write_text(f"{GOOD_LINE}\n\n{bad_line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"chat\.jsonl:3: .*{message}"):
        read_dialogues(path)


def test_non_utf8_line_names_file_and_line(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_bytes(GOOD_LINE.encode() + b"\n\xff\n")
    with pytest.raises(ValueError, match=r"chat\.jsonl:2: not valid UTF-8"):
        read_dialogues(path)


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "chat.jsonl"
    lines = []
    for k in range(11):
        turns = [("user", f"question {k} " * (1 + k % 3)), ("assistant", f"answer {k}"),
                 ("user", "and then?"), ("assistant", "more " * (k % 4))]
        lines.append(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_batches(tokenizer, sft_file, **overrides):
    settings = dict(batch_size=2, seq_len=96, seed=3, eos_id=tokenizer.eos_id, overlong="truncate")
    return SFTBatches(load_sft_pairs(sft_file, tokenizer), **{**settings, **overrides})


def as_lists(batches):
    return [(batch.input_ids.tolist(), batch.prompt_lengths.tolist()) for batch in batches]


def test_epochs_are_deterministic_shuffled_and_resumable(tokenizer, sft_file):
    data = make_batches(tokenizer, sft_file)
    epoch0 = as_lists(data)
    assert data.state_dict() == {"epoch": 1, "position": 0}
    assert len(epoch0) == 5 and data.counts == SFTCounts(truncated=0, dropped=0, left_over=1)
    assert as_lists(make_batches(tokenizer, sft_file)) == epoch0
    assert as_lists(data) != epoch0

    interrupted = make_batches(tokenizer, sft_file)
    stream = iter(interrupted)
    first_two = as_lists([next(stream), next(stream)])
    resumed = make_batches(tokenizer, sft_file)
    resumed.load_state_dict(interrupted.state_dict())
    assert first_two + as_lists(resumed) == epoch0


def test_epoch_counts_truncated_and_dropped(tokenizer, sft_file):
    for overlong in ("truncate", "drop"):
        data = make_batches(tokenizer, sft_file, seq_len=32, pairs="all", overlong=overlong)
        batches = as_lists(data)
        assert all(len(row) <= 32 for ids, _ in batches for row in ids)
        counts = data.counts
        assert counts.truncated + counts.dropped > 0
        assert (counts.truncated == 0) == (overlong == "drop")
        assert 2 * len(batches) + counts.dropped + counts.left_over == 22


def test_data_parallel_ranks_get_disjoint_slices_of_equal_count(tokenizer, sft_file):
    whole = make_batches(tokenizer, sft_file, batch_size=4).epoch_plan(0)[0]
    ranks = [make_batches(tokenizer, sft_file, dp_rank=r, dp_size=2).epoch_plan(0)[0] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(whole)
    assert all(rank0 + rank1 == global_batch for rank0, rank1, global_batch in zip(*ranks, whole))


def test_accumulation_takes_micro_steps_of_one_step_batch_and_leaves_the_rest_over(tokenizer, sft_file):
    """11 pairs in steps of G = 2 x 2 x 2 = 8: one step, 3 left over; rank r's micro-step m is rows
    (m x 2 + r) x 2 onward of the step, so each rank runs 2 micro-batches per epoch."""
    step = make_batches(tokenizer, sft_file, batch_size=8).epoch_plan(0)[0]
    ranks = [make_batches(tokenizer, sft_file, dp_rank=r, dp_size=2, grad_accum=2) for r in range(2)]
    plans = [rank.epoch_plan(0) for rank in ranks]
    assert [len(plan) for plan, _ in plans] == [2, 2] and plans[0][1].left_over == 3
    assert plans[0][0][0] + plans[1][0][0] + plans[0][0][1] + plans[1][0][1] == step[0]
    assert ranks[1].global_batch_size == 8 and ranks[1].first_row(1) == 6


def test_fixed_width_batches_pad_every_row_to_seq_len(tokenizer, sft_file):
    batches = as_lists(make_batches(tokenizer, sft_file, pad_to=96))
    assert all(len(row) == 96 for ids, _ in batches for row in ids)
    with pytest.raises(ValueError, match="seq_len=96"):
        make_batches(tokenizer, sft_file, pad_to=95)


def test_stream_runs_epoch_after_epoch_and_refuses_other_data_on_resume(tokenizer, sft_file):
    """The trainer's stream: epochs back to back (5 batches each here), resumable mid-epoch from the
    merged state, and a saved position is refused for other conversations or a global batch, naming
    what changed."""
    stream = SFTStream(make_batches(tokenizer, sft_file), {"conversations_sha256": "a"})
    assert stream.first_epoch == (5, SFTCounts(truncated=0, dropped=0, left_over=1))
    epochs = as_lists(next(stream) for _ in range(12))
    assert epochs[:5] == as_lists(make_batches(tokenizer, sft_file))
    assert stream.counters()["sft"]["epoch"] == 2 and stream.state_dict()["position"] == 2

    run_state = SFTStream.merge([stream.state_dict()])
    assert (run_state["epoch"], run_state["steps"]) == (2, 2)
    resumed = SFTStream(make_batches(tokenizer, sft_file), {"conversations_sha256": "a"})
    resumed.load_state_dict(run_state)
    assert resumed.describe_change(run_state) is None
    assert as_lists([next(resumed)]) == as_lists([next(stream)])
    with pytest.raises(ValueError, match="conversations_sha256: 'a' in the checkpoint, 'b' now"):
        SFTStream(make_batches(tokenizer, sft_file), {"conversations_sha256": "b"}).load_state_dict(run_state)
    with pytest.raises(ValueError, match="global_batch_size: 2 in the checkpoint, 3 now"):
        SFTStream(make_batches(tokenizer, sft_file, batch_size=3),
                  {"conversations_sha256": "a"}).load_state_dict(run_state)
    with pytest.raises(ValueError, match="no full optimizer step of 12 pairs"):
        next(SFTStream(make_batches(tokenizer, sft_file, batch_size=12), {}))
