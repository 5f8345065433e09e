"""Elastic SFT resume: a fine-tuning run's data continues under another data-parallel size or
micro-batch / accumulation split of the same global batch, with every optimizer step reading the
same pairs on the same global rows (the rows that key the noise) as the uninterrupted run."""

from __future__ import annotations

import json

import pytest
from support.trainer_order import step_micro_batches

from data_pipeline.corpus import stdlib_root
from data_pipeline.sft import SFTBatches, SFTStream, load_sft_pairs
from data_pipeline.tokenizer import train_bpe

SEQ_LEN = 96
IDENTITY = {"conversations_sha256": "c0ffee", "tokenizer_sha256": "beef"}
# (dp_size, micro-batch size, accumulation): each splits the global batch of 8 pairs
SPLITS = [(1, 4, 2), (2, 2, 2), (4, 2, 1), (1, 8, 1)]
STEPS_PER_EPOCH = 5  # 43 conversations, one pair each, a few too long, in steps of 8


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe([stdlib_root() / "abc.py"], 512, tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def conversations(tokenizer, tmp_path_factory):
    """43 two-answer conversations of varied lengths in a JSONL file, as their (prompt, response) pairs."""
    path = tmp_path_factory.mktemp("sft") / "chat.jsonl"
    lines = []
    for k in range(43):
        turns = [("user", f"question {k} " * (1 + k % 5)), ("assistant", f"answer {k} " * (1 + k % 3)),
                 ("user", "and then?"), ("assistant", "more " * (k % 7))]
        lines.append(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return load_sft_pairs(path, tokenizer)


def make_streams(conversations, eos_id, split, *, seed=3, pad_to="longest", identity=IDENTITY):
    dp_size, micro, accumulation = split
    return [SFTStream(SFTBatches(conversations, batch_size=micro, seq_len=SEQ_LEN, seed=seed, eos_id=eos_id,
                                 overlong="truncate", pad_to=pad_to, dp_rank=rank, dp_size=dp_size,
                                 grad_accum=accumulation), identity)
            for rank in range(dp_size)]


def read_steps(streams, n_steps, eos_id, keep_padding=False):
    """`n_steps` optimizer steps as the trainer reads them: per step, its rows by global row
    (`first_global_row`), each (token ids, prompt length), the EOS padding stripped unless kept."""
    b = streams[0].batches
    steps = []
    for _ in range(n_steps):
        rows = {}
        for first, batch in step_micro_batches(streams, dp_size=b.dp_size, micro_batch_size=b.batch_size,
                                               grad_accum=b.grad_accum):
            for i, (ids, prompt_length) in enumerate(zip(batch.input_ids.tolist(), batch.prompt_lengths.tolist())):
                while not keep_padding and ids[-1] == eos_id:
                    ids = ids[:-1]
                rows[first + i] = (ids, prompt_length)
        assert sorted(rows) == list(range(b.global_batch_size))
        steps.append([rows[g] for g in range(b.global_batch_size)])
    return steps


def resumed_streams(conversations, eos_id, states, split):
    run_state = SFTStream.merge(states)
    streams = make_streams(conversations, eos_id, split)
    for stream in streams:
        stream.load_state_dict(run_state)
    return streams


def test_each_step_reads_the_same_pairs_on_the_same_rows_whatever_the_split(conversations, tokenizer):
    eos = tokenizer.eos_id
    n_steps = STEPS_PER_EPOCH + 2  # into the second epoch
    reads = {split: read_steps(make_streams(conversations, eos, split), n_steps, eos) for split in SPLITS}
    reference = reads[SPLITS[0]]
    assert all(read == reference for read in reads.values())
    layout_free = make_streams(conversations, eos, SPLITS[0])[0].batches.epoch_steps(0)[0]
    assert [[(pair.prompt + pair.response, len(pair.prompt)) for pair in step] for step in layout_free] == \
        reference[:STEPS_PER_EPOCH]
    other_seed = read_steps(make_streams(conversations, eos, SPLITS[1], seed=4), n_steps, eos)
    assert other_seed != reference  # negative control: the comparison can tell two plans apart


def test_epoch_lengths_follow_the_global_batch(conversations, tokenizer):
    for split in SPLITS:
        micro_batches, counts = make_streams(conversations, tokenizer.eos_id, split)[0].first_epoch
        assert micro_batches == STEPS_PER_EPOCH * split[2]
        assert counts.left_over == len(conversations) - counts.dropped - 8 * STEPS_PER_EPOCH


def test_padded_to_seq_len_the_rows_are_identical_tensors_in_every_split(conversations, tokenizer):
    """Under pad_to=seq_len nothing depends on the split; under "longest" a row's padding does."""
    eos = tokenizer.eos_id
    padded = [read_steps(make_streams(conversations, eos, split, pad_to=SEQ_LEN), 3, eos, keep_padding=True)
              for split in SPLITS]
    assert all(read == padded[0] for read in padded)
    longest = [read_steps(make_streams(conversations, eos, split), 3, eos, keep_padding=True)
               for split in ((1, 8, 1), (4, 2, 1))]
    assert longest[0] != longest[1]


@pytest.mark.parametrize("new_split", [(4, 2, 1), (1, 8, 1)])
@pytest.mark.parametrize("steps_before", [2, STEPS_PER_EPOCH, STEPS_PER_EPOCH + 1])
def test_resume_under_another_split_continues_the_uninterrupted_stream(conversations, tokenizer, new_split,
                                                                       steps_before):
    """(DP 2, micro 2, accumulation 2) for some steps (mid-epoch, at the epoch's end, into the next),
    then the merged state under another split: every later step reads what the uninterrupted run
    reads, row by row (so the same pairs per step); a state one step short reads something else."""
    eos, old_split, n_steps = tokenizer.eos_id, (2, 2, 2), 2 * STEPS_PER_EPOCH + 1
    uninterrupted = read_steps(make_streams(conversations, eos, old_split), n_steps, eos)
    before = make_streams(conversations, eos, old_split)
    assert read_steps(before, steps_before, eos) == uninterrupted[:steps_before]
    states = [stream.state_dict() for stream in before]

    after = resumed_streams(conversations, eos, states, new_split)
    assert read_steps(after, n_steps - steps_before, eos) == uninterrupted[steps_before:]
    assert after[0].describe_change(SFTStream.merge(states)) == (
        f"SFT data: continues from DP 2 x micro 2 x accumulation 2 to DP {new_split[0]} x micro {new_split[1]} "
        f"x accumulation {new_split[2]}")

    run_state = SFTStream.merge(states)
    one_step_short = {**run_state, "steps": run_state["steps"] - 1}
    wrong = make_streams(conversations, eos, new_split)
    for stream in wrong:
        stream.load_state_dict(one_step_short)
    assert read_steps(wrong, n_steps - steps_before, eos) != uninterrupted[steps_before:]


def test_answer_tokens_are_the_run_total_and_continue_on_rank_zero(conversations, tokenizer):
    eos = tokenizer.eos_id
    before = make_streams(conversations, eos, (2, 2, 2))
    read_steps(before, 3, eos)
    states = [stream.state_dict() for stream in before]
    total = sum(stream.answer_tokens for stream in before)
    # tensor / pipeline peers repeat a data-parallel rank's state: counted once
    assert SFTStream.merge(states + states[::-1])["answer_tokens"] == SFTStream.merge(states)["answer_tokens"] == total
    after = resumed_streams(conversations, eos, states, (4, 2, 1))
    assert [stream.answer_tokens for stream in after] == [total, 0, 0, 0]


def test_merged_state_keeps_the_run_settings_and_the_saved_layout(conversations, tokenizer):
    streams = make_streams(conversations, tokenizer.eos_id, (2, 2, 2))
    run_state = SFTStream.merge([stream.state_dict() for stream in streams])
    assert run_state == {"epoch": 0, "steps": 0, "answer_tokens": 0,
                         "settings": {"global_batch_size": 8, "seq_len": SEQ_LEN, "seed": 3, "pairs": "one",
                                      "overlong": "truncate", "pad_to": "longest"},
                         "saved_layout": {"dp_size": 2, "batch_size": 2, "grad_accum": 2}, "identity": IDENTITY}


def one_line_error(call, match):
    with pytest.raises(ValueError, match=match) as error:
        call()
    assert "\n" not in str(error.value)


def test_resume_refuses_another_global_batch_seed_or_conversations(conversations, tokenizer):
    eos = tokenizer.eos_id
    before = make_streams(conversations, eos, (2, 2, 2))
    read_steps(before, 1, eos)
    run_state = SFTStream.merge([stream.state_dict() for stream in before])
    one_line_error(lambda: make_streams(conversations, eos, (2, 2, 4))[0].load_state_dict(run_state),
                   "global_batch_size: 8 in the checkpoint, 16 now.*same conversations, tokenizer, seed, global batch")
    one_line_error(lambda: make_streams(conversations, eos, (2, 2, 2), seed=5)[0].load_state_dict(run_state),
                   "seed: 3 in the checkpoint, 5 now")
    other_data = {**IDENTITY, "conversations_sha256": "f00d"}
    other_stream = make_streams(conversations, eos, (2, 2, 2), identity=other_data)[0]
    one_line_error(lambda: other_stream.load_state_dict(run_state),
                   "conversations_sha256: 'c0ffee' in the checkpoint, 'f00d' now")
    one_line_error(lambda: make_streams(conversations, eos, (2, 2, 2))[0].load_state_dict(before[0].state_dict()),
                   "expected the run's merged state")
    too_far = {**run_state, "steps": STEPS_PER_EPOCH + 1}
    one_line_error(lambda: make_streams(conversations, eos, (2, 2, 2))[0].load_state_dict(too_far),
                   f"{STEPS_PER_EPOCH + 1} steps done in epoch 0, which has {STEPS_PER_EPOCH}")


def test_merge_refuses_mid_step_disagreeing_or_missing_ranks(conversations, tokenizer):
    streams = make_streams(conversations, tokenizer.eos_id, (2, 2, 2))
    for stream in streams:
        next(stream)  # one micro-batch of an optimizer step of two
    states = [stream.state_dict() for stream in streams]
    one_line_error(lambda: SFTStream.merge(states), "1 into an optimizer step of 2; save at a step boundary")
    next(streams[0])
    one_line_error(lambda: SFTStream.merge([streams[0].state_dict(), streams[1].state_dict()]),
                   "the ranks disagree on position")
    one_line_error(lambda: SFTStream.merge([streams[0].state_dict()]), r"no state from data-parallel rank\(s\) \[1\]")
    one_line_error(lambda: SFTStream.merge([]), "no rank state to merge")
