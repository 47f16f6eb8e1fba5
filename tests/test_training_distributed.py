"""``uae train`` under torchrun's environment on two gloo processes (CPU): the ranks agree on when to stop.

- a scheduler's SIGTERM reaching one rank stops both after the same step, which rank 0 checkpoints; ``--resume``
  on two ranks then ends bit-identical to an uninterrupted two-rank run;
- a non-finite loss on one rank raises on both (before, the other rank waited in the next collective);
- two ranks of 4 questions train what one process of 8 does (passages unique across ranks, the global mean loss).

Every scenario runs under a deadline: a hang fails the test instead of blocking CI.
"""
import json
import os
import signal
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from test_training import TRAIN, tiny, write_utilities  # noqa: F401 (tiny: fixture)

WORLD = 2
RUN = dict(max_steps=4, batch_size=4, passages_per_query=3, max_passage_length=32, lr=1e-3, seed=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, scenario, utils, student, out, results):
    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    import uae_fast.ops.infonce as ops
    from uae_fast.training import Stopped, TrainConfig, train

    if rank == 1:  # rank 1 draws more random numbers than rank 0 (so their RNG states differ: a resume that
        real, calls = ops.utility_infonce, []  # restored rank 0's state on rank 1 would change its dropout), and
        # in the sigterm / nan scenarios something happens to it alone, in step 2

        def on_rank1(*a, **k):
            calls.append(1)
            torch.rand(3)
            if len(calls) == 2 and scenario == "overflow":  # finite embeddings whose scores overflow fp32
                a = (a[0] * 1e38,) + a[1:]
            if len(calls) == 2 and scenario == "raise":
                raise ValueError("injected: the loss failed on rank 1")
            loss = real(*a, **k)
            if len(calls) == 2 and scenario == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            elif len(calls) == 2 and scenario == "nan":  # a NaN value whose gradient stays finite: the loss
                loss = loss + loss.detach() * float("nan")  # check, not the op's, must see it
            return loss

        ops.utility_infonce = on_rank1
        if scenario == "nanemb":  # rank 1's encoder diverges in step 2: its embeddings, not the loss, go NaN
            import uae_fast.training as tr

            real_fwd, fwd_calls = tr._Towers.forward, []

            def nan_forward(self, *a, **k):
                fwd_calls.append(1)
                q, p = real_fwd(self, *a, **k)
                return (q * float("nan"), p) if len(fwd_calls) == 2 else (q, p)

            tr._Towers.forward = nan_forward
        if scenario == "skew":  # rank 1 draws other passages for its second micro-batch (other candidates there)
            import dataclasses

            import uae_fast.training as tr

            real_batch = tr.BatchSampler.batch
            tr.BatchSampler.batch = lambda self, m: (lambda b: dataclasses.replace(b, digest=b.digest ^ 1) if m == 1 else b)(
                real_batch(self, m))
        if scenario == "hidden":  # rank 1 on a node whose --out is not rank 0's storage: it sees no checkpoint
            import uae_fast.training as tr

            real_isfile = os.path.isfile
            tr.os.path.isfile = lambda p: False if "trainer_state" in str(p) else real_isfile(p)
    if scenario == "otherutils" and rank == 1:  # a node whose table holds other values under the same ids
        import gzip

        with gzip.open(utils, "rt") as f:
            rows = [json.loads(line) for line in f]
        for r in rows[1:]:
            r["utility"] = -r["utility"]
        utils = os.path.join(results, "other-utils.jsonl.gz")
        with gzip.open(utils, "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    res = {}
    try:
        s = train(TrainConfig(data=TRAIN, utilities=utils, student=student, **{**RUN, **_accum(scenario)}), out,
                  resume=scenario in ("resume", "hidden"), save_every=100, progress=False)
        res["steps"] = s["steps"]
    except Stopped as e:
        res["stopped_at"] = e.step
    except (FloatingPointError, ValueError, RuntimeError) as e:
        res["error"] = str(e)
    finally:
        import gc

        gc.collect()  # a DDP module kept alive by the traceback's frames can hang the group's teardown
        if dist.is_initialized():
            dist.destroy_process_group()
    with open(os.path.join(results, f"{scenario}-{rank}.json"), "w") as f:
        json.dump(res, f)


def _accum(scenario, world=1):
    """Scenario "accum": the same global batch in two micro-batches (DDP syncs only the last one's backward)."""
    return {"grad_accum": 2, "batch_size": world * RUN["batch_size"] // 2} if scenario == "accum" else {}


def _run(scenario, utils, student, out, results, deadline_s=180):
    ctx = mp.start_processes(_worker, args=(_free_port(), scenario, utils, student, str(out), str(results)),
                             nprocs=WORLD, join=False, start_method="spawn")
    end = time.time() + deadline_s
    while not ctx.join(timeout=1):
        if time.time() > end:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{scenario}: the ranks did not finish in {deadline_s} s (a hang)")
    return [json.load(open(os.path.join(results, f"{scenario}-{r}.json"))) for r in range(WORLD)]


@pytest.fixture(scope="module")
def utils(tmp_path_factory):
    from uae_fast.data import load_dataset

    return write_utilities(tmp_path_factory.mktemp("u") / "u.jsonl.gz", load_dataset(TRAIN))


def test_ranks_stop_together_and_resume_exactly(tmp_path, tiny, utils):  # noqa: F811
    from safetensors.torch import load_file

    from uae_fast.training import latest_checkpoint

    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _run("full", utils, tiny, ref, tmp_path) == [{"steps": 4}] * WORLD
    assert _run("sigterm", utils, tiny, run, tmp_path) == [{"stopped_at": 2}] * WORLD
    assert latest_checkpoint(str(run)).endswith("step-000002") and not (run / "model.safetensors").exists()
    state = torch.load(os.path.join(latest_checkpoint(str(run)), "trainer_state.pt"), weights_only=False)
    assert isinstance(state["rng"], list) and len(state["rng"]) == WORLD  # each rank's RNG state
    # a rank that cannot read rank 0's checkpoint (nodes without shared storage) stops every rank, not a hang
    hidden = _run("hidden", utils, tiny, run, tmp_path)
    assert all("not every rank can read" in r.get("error", "") for r in hidden), hidden
    assert _run("resume", utils, tiny, run, tmp_path) == [{"steps": 4}] * WORLD
    wa, wb = load_file(ref / "model.safetensors"), load_file(run / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (ref / "train_log.jsonl").read_text() == (run / "train_log.jsonl").read_text()


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path, tiny, utils):  # noqa: F811
    r0, r1 = _run("nan", utils, tiny, tmp_path / "run", tmp_path)
    assert r1["error"].startswith("loss is nan at step 1")
    assert r0["error"].startswith("loss is not finite on another rank at step 1")


def test_an_overflowing_or_failing_loss_on_one_rank_stops_every_rank(tmp_path, tiny, utils):  # noqa: F811
    # the op raises on an overflow, in forward or backward; on one rank alone that left the other waiting in
    # the gather's backward all-reduce: the trainer has it return inf and stops every rank with the step
    r0, r1 = _run("overflow", utils, tiny, tmp_path / "run", tmp_path)
    assert r1.get("error", "").startswith(("loss is inf at step 1", "loss is nan at step 1")), r1
    assert r0["error"].startswith("loss is not finite on another rank at step 1"), r0
    r0, r1 = _run("raise", utils, tiny, tmp_path / "run2", tmp_path)
    assert r1["error"] == "injected: the loss failed on rank 1", r1
    assert r0["error"].startswith("the loss failed on another rank at step 1"), r0


def test_non_finite_embeddings_on_one_rank_stop_every_rank_with_the_step(tmp_path, tiny, utils):  # noqa: F811
    # the op would refuse them on rank 1 alone ("q contains NaN"), leaving rank 0 in the backward's all-reduce
    r0, r1 = _run("nanemb", utils, tiny, tmp_path / "run", tmp_path)
    for r in (r0, r1):
        assert r["error"].startswith("the encoder's embeddings are not finite at step 1"), r


def test_ranks_that_draw_different_passages_stop_together(tmp_path, tiny, utils):  # noqa: F811
    # silently wrong targets (one rank's indices into another rank's passages) become one error on every rank
    for r in _run("skew", utils, tiny, tmp_path / "run", tmp_path):
        assert r["error"].startswith("micro-batch 1: the ranks drew different passages"), r


def test_ranks_with_different_tables_stop_before_training(tmp_path, tiny, utils):  # noqa: F811
    # the same question and passage ids, other utility values: the per-batch digest cannot see it, the start check does
    for r in _run("otherutils", utils, tiny, tmp_path / "run", tmp_path):
        assert r["error"].startswith("the ranks' data or utilities files differ"), r


@pytest.mark.parametrize("scenario", ["full", "accum"])
def test_two_ranks_train_what_one_process_with_their_global_batch_does(tmp_path, utils, scenario):  # noqa: F811
    # Without dropout the only differences are the float order of DDP's all-reduce. Before the sampler drew
    # the global batch on every rank, a paragraph drawn on both ranks was a negative for the other rank's
    # queries that had it as a target, and the teacher mass of passages on the other rank was lost.
    from safetensors.torch import load_file
    from test_student import make_tiny_encoder

    from uae_fast.training import TrainConfig, train

    student = make_tiny_encoder(tmp_path / "enc", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    one, threads = tmp_path / "one", torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run
    try:
        train(TrainConfig(data=TRAIN, utilities=utils, student=student,
                          **{**RUN, "batch_size": WORLD * RUN["batch_size"], **_accum(scenario, WORLD)}),
              str(one), save_every=100, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert _run(scenario, utils, student, tmp_path / "two", tmp_path) == [{"steps": 4}] * WORLD
    wa, wb = load_file(one / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    moved = max(float((wa[k] - w0).abs().max()) for k, w0 in load_file(os.path.join(student, "model.safetensors")).items())
    assert moved > 1e-3  # it trained
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)
