"""The pretraining stream under another layout: the global batch of every step is the same whatever
the data-parallel size, micro-batch split and worker count, and a run resumed under another layout
neither reads a token twice nor skips one; what cannot be resumed is refused in one line.

Ranks are simulated by one loader per data-parallel rank in one process (the stream depends on the
data-parallel rank only: tests/test_data_ranks.py checks that in a real multi-process run). Every
token id is unique and each source has its own id range, so where a token came from is exact.
"""

import json

import numpy as np
import pytest
import torch
from support.trainer_order import step_micro_batches

from data_pipeline.seeding import keyed_generator
from data_pipeline.shards import Manifest, read_manifest, shard_name, write_manifest, write_shard
from data_pipeline.stream_state import SourceCursor, start_position
from data_pipeline.streaming import SourceSpec, TokenBatchLoader, load_sources

VOCAB = 300_000
SHA = "6" * 64
SEED = 99
SEQ_LEN = 8
FIRST_ID = {"a": 70_000, "b": 200_000}  # a's ids below b's first


def write_source(directory, first_id, num_shards, seed):
    """Shards of 1-4 samples of 1-12 tokens, consecutive unique ids from first_id."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    next_id, infos = first_id, []
    for index in range(num_shards):
        samples = []
        for length in rng.integers(1, 13, size=rng.integers(1, 5)):
            samples.append(np.arange(next_id, next_id + length, dtype=np.uint32))
            next_id += int(length)
        infos.append(write_shard(directory / shard_name(index), samples, documents=len(samples)))
    write_manifest(directory, Manifest(tokenizer_sha256=SHA, vocab_size=VOCAB, eos_id=0, shards=infos))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    write_source(root / "a", FIRST_ID["a"], num_shards=13, seed=1)
    write_source(root / "b", FIRST_ID["b"], num_shards=7, seed=2)
    return [SourceSpec("a", str(root / "a"), 0.7), SourceSpec("b", str(root / "b"), 0.3)]


def rank_loaders(specs, *, dp_size, batch_size, grad_accum, num_workers, **options):
    settings = dict(seq_len=SEQ_LEN, seed=SEED, vocab_size=VOCAB, tokenizer_sha256=SHA, variable_length_prob=0.0)
    settings.update(options)
    return [TokenBatchLoader(specs, dp_rank=rank, dp_size=dp_size, batch_size=batch_size, grad_accum=grad_accum,
                             num_workers=num_workers, **settings) for rank in range(dp_size)]


def run_steps(loaders, steps):
    """Each step's global batch as {lane: row tokens}, read as the trainer reads it: every rank
    takes grad_accum micro-batches per step; row i of micro-step m lands on the global row the loss
    keys its noise on."""
    config = loaders[0].config
    batches = []
    for _ in range(steps):
        rows = {}
        for first_row, batch in step_micro_batches(loaders, dp_size=config.dp_size,
                                                   micro_batch_size=config.batch_size, grad_accum=config.grad_accum):
            assert batch.lanes == tuple(range(first_row, first_row + config.batch_size))
            for lane, row in zip(batch.lanes, batch.input_ids.numpy()):
                rows[lane] = row
        assert sorted(rows) == list(range(config.global_batch_size))
        batches.append(rows)
    for loader in loaders:
        loader.close()
    return batches


def same_global_batches(first, second):
    return all(a.keys() == b.keys() and all(np.array_equal(a[lane], b[lane]) for lane in a)
               for a, b in zip(first, second, strict=True))


LAYOUTS = [  # (dp_size, micro-batch, accumulation, workers): 8 rows per step each
    (1, 4, 2, 0), (2, 2, 2, 1), (4, 2, 1, 2), (2, 4, 1, 3), (1, 8, 1, 2), (8, 1, 1, 0)]


def test_the_global_batch_does_not_depend_on_the_layout(sources):
    steps = 6
    reference = run_steps(rank_loaders(sources, dp_size=1, batch_size=1, grad_accum=8, num_workers=0), steps)
    for dp_size, batch_size, grad_accum, workers in LAYOUTS:
        batches = run_steps(rank_loaders(sources, dp_size=dp_size, batch_size=batch_size, grad_accum=grad_accum,
                                         num_workers=workers), steps)
        assert same_global_batches(batches, reference), (dp_size, batch_size, grad_accum, workers)
        for got, want in zip(batches, reference):  # the multiset of rows, too
            assert sorted(map(tuple, got.values())) == sorted(map(tuple, want.values()))
    # negative controls: the comparison sees two lanes swapped, and another seed's data
    swapped = [dict(rows) for rows in reference]
    swapped[3][2], swapped[3][5] = swapped[3][5], swapped[3][2]
    assert not same_global_batches(swapped, reference)
    other_seed = run_steps(rank_loaders(sources, dp_size=2, batch_size=2, grad_accum=2, num_workers=0,
                                        seed=SEED + 1), steps)
    assert not same_global_batches(other_seed, reference)


def lane_source_tokens(batches):
    """Per (lane, source), the tokens the lane read from that source, in order."""
    tokens = {}
    for rows in batches:
        for lane, row in rows.items():
            source = "a" if row[0] < FIRST_ID["b"] else "b"
            assert (row < FIRST_ID["b"]).all() or (row >= FIRST_ID["b"]).all()  # a row reads one source
            tokens.setdefault((lane, source), []).append(row)
    return {key: np.concatenate(rows) for key, rows in tokens.items()}


def stream_mismatches(specs, read, global_batch_size, run_state=None):
    """The (lane, source) pairs whose tokens are not the start of that lane's own stream in the
    source (read with a fresh cursor); with `run_state`, also those whose saved position is not
    where that stream stands after those tokens."""
    wrong = []
    for source in load_sources(specs, SHA):
        for lane in range(global_batch_size):
            got = read.get((lane, source.name), np.zeros(0, dtype=np.int64))
            cursor = SourceCursor(source, seed=SEED, num_lanes=global_batch_size, vocab_size=VOCAB,
                                  position=start_position(lane))
            if not np.array_equal(cursor.take(len(got)), got):
                wrong.append((lane, source.name))
            elif run_state is not None and run_state["lanes"][str(lane)][source.name] != cursor.position():
                wrong.append((lane, source.name))
    return wrong


def merged(loaders):
    return TokenBatchLoader.merge([json.loads(json.dumps(loader.state_dict())) for loader in loaders])


def test_resume_under_another_layout_reads_every_token_once(sources):
    options = dict(variable_length_prob=0.3, variable_length_mode="carry")
    steps_before, steps_after = 5, 7
    before = rank_loaders(sources, dp_size=2, batch_size=4, grad_accum=1, num_workers=1, **options)
    read_before = run_steps(before, steps_before)
    state = merged(before)
    assert state["steps"] == steps_before and sorted(map(int, state["lanes"])) == list(range(8))

    after = rank_loaders(sources, dp_size=4, batch_size=1, grad_accum=2, num_workers=2, **options)
    for loader in after:
        loader.load_state_dict(state)
    assert after[0].describe_change(state) == ("data stream: 8 lanes continue from DP 2 x micro 4 x accumulation 1, "
                                               "1 worker to DP 4 x micro 1 x accumulation 2, 2 workers")
    read_after = run_steps(after, steps_after)
    shortened = [len(row) < SEQ_LEN for rows in read_before + read_after for row in rows.values()]
    assert 0 < sum(shortened) < len(shortened)  # the 1% rule (here 30%) cut some micro-batches

    for step, rows in enumerate(read_before + read_after):  # the steps continue: each row's source is its draw
        for lane, row in rows.items():
            draw = torch.rand((), dtype=torch.float64, generator=keyed_generator(SEED, "mix", lane, step)).item()
            assert (row[0] < FIRST_ID["b"]) == (draw < 0.7)
    read = lane_source_tokens(read_before + read_after)
    assert {source for _, source in read} == {"a", "b"}
    final = merged(after)
    assert final["steps"] == steps_before + steps_after
    assert stream_mismatches(sources, read, 8, final) == []  # nothing read twice, nothing skipped
    first_reads = [next(loader) for loader in after]
    manifests = [read_manifest(spec.path) for spec in sources]
    one_shard_per_source_and_lane = 2 * sum(max(s.samples for s in m.shards) for m in manifests)
    assert all(b.restore_decoded_samples <= one_shard_per_source_and_lane for b in first_reads)
    totals = [sum(loader.counters()[name]["tokens"] for loader in after) - sum(b.source_tokens[name]
                                                                              for b in first_reads)
              for name in ("a", "b")]
    assert totals == [sum(len(t) for (_, s), t in read.items() if s == name) for name in ("a", "b")]

    # negative controls: one lane's position moved, or the state not loaded, read wrong tokens
    moved = json.loads(json.dumps(state))
    position = moved["lanes"]["3"]["a"]
    cursor = SourceCursor(load_sources(sources, SHA)[0], seed=SEED, num_lanes=8, vocab_size=VOCAB, position=position)
    cursor.take(1)
    moved["lanes"]["3"]["a"] = cursor.position()
    for wrong_state in (moved, None):
        again = rank_loaders(sources, dp_size=4, batch_size=1, grad_accum=2, num_workers=0, **options)
        if wrong_state is not None:
            for loader in again:
                loader.load_state_dict(wrong_state)
        wrong = stream_mismatches(sources, lane_source_tokens(read_before + run_steps(again, steps_after)), 8)
        assert wrong != [] and (wrong_state is None or wrong == [(3, "a")])


def test_resume_under_another_layout_continues_the_same_global_batches(sources):
    steps_before, steps_after = 3, 4
    reference = run_steps(rank_loaders(sources, dp_size=1, batch_size=8, grad_accum=1, num_workers=0),
                          steps_before + steps_after)
    before = rank_loaders(sources, dp_size=4, batch_size=1, grad_accum=2, num_workers=1)
    assert same_global_batches(run_steps(before, steps_before), reference[:steps_before])
    state = merged(before)
    after = rank_loaders(sources, dp_size=2, batch_size=2, grad_accum=2, num_workers=2)
    for loader in after:
        loader.load_state_dict(state)
    assert same_global_batches(run_steps(after, steps_after), reference[steps_before:])
    not_loaded = rank_loaders(sources, dp_size=2, batch_size=2, grad_accum=2, num_workers=0)  # negative control
    assert not same_global_batches(run_steps(not_loaded, steps_after), reference[steps_before:])


@pytest.fixture(scope="module")
def saved(sources):
    """The run state of two ranks after 3 steps of 2 micro-batches of 2 rows, and the ranks' states."""
    loaders = rank_loaders(sources, dp_size=2, batch_size=2, grad_accum=2, num_workers=0, variable_length_prob=0.1)
    run_steps(loaders, 3)
    states = [loader.state_dict() for loader in loaders]
    return TokenBatchLoader.merge(states), states


def test_same_layout_resume_needs_no_change_note_and_one_rank_state_loads_directly(sources, saved):
    run_state, _ = saved
    same = rank_loaders(sources, dp_size=2, batch_size=2, grad_accum=2, num_workers=0, variable_length_prob=0.1)
    assert same[0].describe_change(run_state) is None
    single = rank_loaders(sources, dp_size=1, batch_size=4, grad_accum=1, num_workers=0)
    run_steps(single, 2)
    direct = rank_loaders(sources, dp_size=1, batch_size=4, grad_accum=1, num_workers=0)[0]
    direct.load_state_dict(single[0].state_dict())
    assert direct.state_dict() == single[0].state_dict()


@pytest.mark.parametrize("change,field", [
    (dict(seed=SEED + 1), "seed"), (dict(seq_len=SEQ_LEN * 2), "seq_len"),
    (dict(batch_size=3), "global_batch_size"), (dict(variable_length_prob=0.2), "variable_length_prob"),
    (dict(variable_length_mode="discard"), "variable_length_mode"), ("weights", "sources")])
def test_a_change_that_breaks_the_stream_is_refused_in_one_line(sources, saved, change, field):
    run_state, _ = saved
    options = dict(dp_size=2, batch_size=2, grad_accum=2, num_workers=0, variable_length_prob=0.1)
    specs = sources
    if change == "weights":
        specs = [SourceSpec(spec.name, spec.path, 1.0) for spec in sources]
    else:
        options.update(change)
    loader = rank_loaders(specs, **options)[0]
    with pytest.raises(ValueError, match=f"^data state: {field} is .* in the checkpoint but .* now; resume with "
                                         f"the same .*start the data stream afresh") as caught:
        loader.load_state_dict(run_state)
    assert "\n" not in str(caught.value)


def test_unloadable_states_are_refused(sources, saved):
    run_state, states = saved
    loader = rank_loaders(sources, dp_size=2, batch_size=2, grad_accum=2, num_workers=0, variable_length_prob=0.1)[0]
    old_format = dict(run_state, format="llada-token-stream/3")
    for read in (loader.load_state_dict, loader.describe_change):
        with pytest.raises(ValueError, match="format 'llada-token-stream/3', expected 'llada-token-stream/4'"):
            read(old_format)
    with pytest.raises(ValueError, match=r"lanes \[2, 3, 6, 7\] of 8 are missing .*ranks \[0\] of 2"):
        TokenBatchLoader.merge(states[:1])
    with pytest.raises(ValueError, match="lanes .* are missing"):  # one rank's state alone is not the run's
        loader.load_state_dict(states[0])
    with pytest.raises(ValueError, match="micro_batches is 6 on data-parallel rank 0 but 7 on rank 1"):
        TokenBatchLoader.merge([states[0], dict(states[1], micro_batches=7)])
    with pytest.raises(ValueError, match="two states of data-parallel rank 1 differ"):
        TokenBatchLoader.merge([states[0], states[1], dict(states[1], micro_batches=7)])
    mid_step = rank_loaders(sources, dp_size=2, batch_size=2, grad_accum=2, num_workers=0)
    for loader in mid_step:
        next(loader)
    with pytest.raises(ValueError, match="after 1 micro-batches, not a whole number of steps of 2"):
        TokenBatchLoader.merge([loader.state_dict() for loader in mid_step])


def test_merge_takes_each_replica_once(saved):
    run_state, states = saved
    peers = [states[0], states[0], states[1], states[1]]  # tensor-parallel pairs save the same state
    assert TokenBatchLoader.merge(peers) == run_state
    assert run_state["consumed_tokens"] == {
        name: states[0]["consumed_tokens"][name] + states[1]["consumed_tokens"][name] for name in ("a", "b")}
    assert run_state["steps"] == 3 and run_state["saved_layout"] == {"dp_size": 2, "batch_size": 2, "grad_accum": 2,
                                                                     "num_workers": 0}
