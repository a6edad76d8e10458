"""Learning-rate decay, the metric meter and checkpoint files."""

from __future__ import annotations

import itertools
import pickle

import pytest
import torch

from capsrun import checkpoint
from capsrun.errors import CheckpointError
from capsrun.metrics import Meter
from capsrun.schedules import ExponentialDecay, LinearDecay, exponential_decay, linear_decay

# --- ExponentialDecay -------------------------------------------------------------------------


def test_exponential_decay_factor():
    decay = ExponentialDecay(0.96, 2000, floor=1e-3)
    assert decay(0) == 1.0
    assert decay(2000) == pytest.approx(0.96)
    assert decay(4000) == pytest.approx(0.96**2)
    assert decay(1000) == pytest.approx(0.96**0.5)  # smooth, not staircase
    assert decay(1) < 1.0
    assert decay(10**7) == 1e-3  # 0.96**5000 is far below the floor
    assert decay(10**9) == 1e-3


def test_exponential_decay_pickles():
    decay = pickle.loads(pickle.dumps(ExponentialDecay(0.5, 10, 0.01)))
    assert decay(10) == pytest.approx(0.5)


def _adam(lr=1e-3):
    return torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def test_exponential_decay_scheduler():
    opt = _adam()
    sched = exponential_decay(opt)  # 0.96 every 2000 steps, min_lr 1e-6
    opt.step()  # no gradients, so a no-op; keeps the scheduler from warning about the call order
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    for _ in range(1000):
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.96**0.5, rel=1e-9)
    for _ in range(1000):
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(9.6e-4, rel=1e-9)


def test_exponential_decay_scheduler_floor():
    opt = _adam()
    sched = exponential_decay(opt, decay_rate=0.5, decay_steps=1, min_lr=1e-5)
    opt.step()
    lrs = []
    for _ in range(40):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(5e-4)
    assert min(lrs) >= 1e-5 * (1 - 1e-9)
    assert lrs[-1] == pytest.approx(1e-5)
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_exponential_decay_warmup_ramps_linearly_then_decays():
    decay = ExponentialDecay(0.5, 10, floor=0.0, warmup_steps=4)
    # (step + 1) / 4 times the decay: 0.25 * 1, 0.5 * 0.5**0.1, ...; from step 4 on, the decay alone
    assert decay(0) == pytest.approx(0.25)
    assert decay(1) == pytest.approx(0.5 * 0.5**0.1)
    assert decay(3) == pytest.approx(1.0 * 0.5**0.3)
    assert decay(4) == pytest.approx(0.5**0.4)
    assert ExponentialDecay(0.5, 10, floor=0.0)(0) == 1.0  # no warmup by default


# --- LinearDecay ------------------------------------------------------------------------------


def test_linear_decay_without_a_tail_is_one_straight_line_to_final():
    decay = LinearDecay(100, final=0.2)
    assert [decay(s) for s in (0, 50, 100, 1000)] == pytest.approx([1.0, 0.6, 0.2, 0.2])


def test_linear_decay_tail_is_a_second_slower_line():
    # 100 steps, the last 25 from 0.04 to 0: steps 0-75 from 1 to 0.04, steps 75-100 from 0.04 to 0
    decay = LinearDecay(100, tail=0.25, tail_lr=0.04)
    assert decay(0) == 1.0
    assert decay(30) == pytest.approx(1 - 0.96 * 30 / 75)
    assert decay(75) == pytest.approx(0.04)
    assert decay(85) == pytest.approx(0.04 * 15 / 25)
    assert decay(100) == 0.0 and decay(500) == 0.0
    lrs = [decay(s) for s in range(101)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))
    # the tail spends a quarter of the steps below 0.04; a straight line only 4 of them
    assert sum(x < 0.04 for x in lrs) == 25 and sum(LinearDecay(100)(s) < 0.04 for s in range(101)) == 4


def test_linear_decay_tail_pickles_and_old_state_loads():
    decay = pickle.loads(pickle.dumps(LinearDecay(100, tail=0.5, tail_lr=0.1)))
    assert decay(50) == pytest.approx(0.1)
    # a checkpoint's scheduler state from before the tail existed holds total_steps and final only
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    sched = linear_decay(opt, 100, tail=0.5, tail_lr=0.1)
    state = sched.state_dict()
    state["lr_lambdas"] = [{"total_steps": 100, "final": 0.0}]
    sched.load_state_dict(state)
    assert sched.lr_lambdas[0](50) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tail": 1.0}, "tail must be in"),
        ({"tail": -0.1}, "tail must be in"),
        ({"tail_lr": 1.5}, "tail_lr must be in"),
        ({"final": 0.5, "tail": 0.2, "tail_lr": 0.1}, "tail_lr must be in"),
    ],
)
def test_linear_decay_rejects_tails_that_cannot_work(kwargs, message):
    with pytest.raises(ValueError, match=message):
        linear_decay(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), 100, **kwargs)


# --- Meter ------------------------------------------------------------------------------------


def _filled_meter() -> Meter:
    meter = Meter()
    # batch of 2: mean losses total 1.0, margin 0.5, 1 correct; batch of 6: total 4.0, margin 1.5, 5 correct
    meter.update({"total": torch.tensor(1.0), "margin": torch.tensor(0.5)}, torch.tensor(1), 2)
    meter.update({"total": torch.tensor(4.0), "margin": torch.tensor(1.5)}, torch.tensor(5), 6)
    return meter


def test_meter_weighted_means():
    metrics = _filled_meter().compute("train")
    # total: (2*1 + 6*4) / 8 = 3.25; margin: (2*0.5 + 6*1.5) / 8 = 1.25; accuracy: 6/8 = 75%
    assert metrics == pytest.approx({"train/loss/total": 3.25, "train/loss/margin": 1.25, "train/accuracy": 75.0})


def test_meter_empty_and_reset():
    meter = Meter()
    assert meter.compute("test") == {}
    meter = _filled_meter()
    meter.reset()
    assert meter.count == 0 and meter.compute("test") == {}


def test_meter_detaches():
    w = torch.tensor(2.0, requires_grad=True)
    meter = Meter()
    meter.update({"total": w * 3}, torch.tensor(1), 4)
    assert not meter.sums["total"].requires_grad
    assert meter.compute("x")["x/loss/total"] == pytest.approx(6.0)


def test_meter_state_dict_round_trip():
    meter = _filled_meter()
    state = meter.state_dict()
    restored = Meter()
    restored.load_state_dict(state, torch.device("cpu"))
    assert restored.count == 8
    assert restored.compute("p") == meter.compute("p")
    # it keeps accumulating from where it was
    restored.update({"total": torch.tensor(0.0), "margin": torch.tensor(0.0)}, torch.tensor(2), 2)
    assert restored.compute("p") == pytest.approx({"p/loss/total": 2.6, "p/loss/margin": 1.0, "p/accuracy": 80.0})


# --- checkpoint -------------------------------------------------------------------------------


def _state() -> dict:
    return {
        "model": {"w": torch.arange(6.0).view(2, 3), "b": torch.tensor([0.5])},
        "config": {"model": {"net": {"primary_types": 32, "decoder_hidden": [512, 1024]}}, "name": "mnist"},
        "epoch": 3,
        "meters": [_filled_meter().state_dict()],
    }


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "ckpt" / "last.pt"  # the folder is created
    checkpoint.save(path, _state())
    state = checkpoint.load(path)
    assert state["format"] == checkpoint.FORMAT
    assert torch.equal(state["model"]["w"], torch.arange(6.0).view(2, 3))
    assert torch.equal(state["model"]["b"], torch.tensor([0.5]))
    assert state["config"] == {"model": {"net": {"primary_types": 32, "decoder_hidden": [512, 1024]}}, "name": "mnist"}
    assert state["epoch"] == 3
    meter = Meter()
    meter.load_state_dict(state["meters"][0], torch.device("cpu"))
    assert meter.compute("p") == _filled_meter().compute("p")


def test_checkpoint_save_is_atomic_and_replaces(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(path, _state())
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    checkpoint.save(path, {**_state(), "epoch": 4})
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert checkpoint.load(path)["epoch"] == 4


def test_checkpoint_failed_save_keeps_old_file(tmp_path):
    """A save that fails half-way leaves the previous checkpoint intact and no temporary file."""
    path = tmp_path / "last.pt"
    checkpoint.save(path, _state())

    def broken(f):
        f.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.atomic_write(path, broken)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert checkpoint.load(path)["epoch"] == 3


def _one_line_error(path) -> str:
    """The error a user sees: a CheckpointError, one line, naming the file and where to point instead."""
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(path) in msg
    assert "checkpoints/" in msg  # the fix: which file to pass
    return msg


def test_checkpoint_load_missing(tmp_path):
    assert "does not exist" in _one_line_error(tmp_path / "nope.pt")
    assert "is a directory" in _one_line_error(tmp_path)  # a folder is not a checkpoint file


def test_checkpoint_load_text_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("epoch: 3\nthis is not a checkpoint\n")
    assert "not a" in _one_line_error(path)


def test_checkpoint_load_truncated(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(path, _state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _one_line_error(path)
    path.write_bytes(data[:-1])  # even one byte short
    _one_line_error(path)


def test_checkpoint_load_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    _one_line_error(path)


def test_checkpoint_load_foreign_torch_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"a": 1}, path)
    assert "not a capsrun checkpoint" in _one_line_error(path)
    torch.save([torch.zeros(2)], path)
    assert "not a capsrun checkpoint" in _one_line_error(path)
    # the right format tag but required keys missing
    torch.save({"format": checkpoint.FORMAT, "model": {}}, path)
    assert "not a capsrun checkpoint" in _one_line_error(path)


def test_checkpoint_load_refuses_pickled_objects(tmp_path):
    """weights_only loading: a file that needs arbitrary unpickling is refused, in one line."""
    path = tmp_path / "evil.pt"
    torch.save(
        {"format": checkpoint.FORMAT, "model": {}, "config": {}, "epoch": 0, "x": ExponentialDecay(1, 1, 1)}, path
    )
    _one_line_error(path)


@pytest.mark.parametrize(
    "seconds, said",
    [(4.4, "4 s"), (89, "89 s"), (600, "10 min"), (3 * 3600 + 20 * 60, "3 h 20 min"), (3 * 86400, "3.0 days")],
)
def test_duration_reads_as_people_say_it(seconds, said):
    from capsrun.monitors import duration

    assert duration(seconds) == said


def test_run_clock_speaks_once_after_the_timed_steps(monkeypatch):
    import capsrun.monitors as monitors

    now = iter([10.0, 11.0, 11.5])  # perf_counter: the clock starts, then 3 steps in 1.5 s
    monkeypatch.setattr(monitors.time, "perf_counter", lambda: next(now))
    clock = monitors.RunClock(
        remaining_steps=1005, batch_size=100, device=torch.device("cpu"), skip=2, max_steps=4, min_seconds=99
    )
    said = [clock.step() for _ in range(8)]
    assert said[:5] == [None] * 5  # warm-up, then the clock starts, then three steps timed
    assert said[5].startswith("timed 4 steps: ") and said[6:] == [None, None]
    assert "267 images/s" in said[5] and "the remaining 999 steps take about 6 min" in said[5]


def test_run_clock_times_a_few_steps_however_slow_one_is(monkeypatch):
    import capsrun.monitors as monitors

    now = iter([0.0, 40.0, 60.0])  # a first timed step of 20 s, far past min_seconds
    monkeypatch.setattr(monitors.time, "perf_counter", lambda: next(now))
    clock = monitors.RunClock(remaining_steps=100, batch_size=10, device=torch.device("cpu"), skip=2, min_seconds=5)
    said = [clock.step() for _ in range(5)]
    assert said[:4] == [None] * 4
    assert said[4].startswith("timed 3 steps: 20 s a step")
    assert monitors.RunClock(4, 10, torch.device("cpu"), skip=2).said  # too short to time 3 steps: silent


@pytest.mark.parametrize(
    "score, best, first, expected",
    [
        (0.5, 0.9, True, True),  # the first epoch always makes best.pt, when finite
        (0.9, 0.5, False, True),
        (0.5, 0.5, False, False),  # a tie keeps the earlier epoch
        (0.4, 0.5, False, False),
        (float("nan"), 0.5, False, False),  # never a non-finite score
        (float("nan"), 0.5, True, False),
        (0.1, float("nan"), False, True),  # the first finite score after non-finite ones
    ],
)
def test_best_checkpoint_rule(score, best, first, expected):
    from capsrun.train import improved

    assert improved(score, best, first) is expected


def test_a_checkpoint_carries_a_digest_of_its_contents_and_load_checks_it(tmp_path, caplog):
    state = {"model": {"w": torch.randn(300, 300), "on": torch.tensor(True)}, "config": {"a": 1}, "epoch": 3}
    path = tmp_path / "best.pt"
    checkpoint.save(path, state)
    assert len(torch.load(path, weights_only=True)["digest"]) == 64
    loaded = checkpoint.load(path)
    assert "digest" not in loaded and torch.equal(loaded["model"]["w"], state["model"]["w"])
    changed = torch.load(path, weights_only=True)
    changed["model"]["w"][150, 150] += 1e-6  # one weight, one ulp or so: a different file
    torch.save(changed, path)
    with pytest.raises(CheckpointError, match="is damaged: its contents no longer match the SHA-256 digest"):
        checkpoint.load(path)
    del changed["digest"]  # as capsrun wrote checkpoints before they carried one: loads, said once
    torch.save(changed, path)
    with caplog.at_level("WARNING", logger="capsrun"):
        checkpoint.load(path)
        checkpoint.load(path)
    assert [r.getMessage().endswith("it loads, unverified") for r in caplog.records] == [True]


# --- resume: the RNG state is part of where training stands -----------------------------------------


class _NoisyToy(torch.nn.Module):
    """The toy classifier with input noise from the global RNG in training (as dropout, the capsule
    RBM's chains or VCaps' reparameterisation draw): what a resume must continue exactly."""

    def __init__(self, toy: torch.nn.Module):
        super().__init__()
        self.toy = toy

    def forward(self, x, y=None):
        return self.toy(x + 0.3 * torch.randn_like(x) if self.training else x, y)


def _noisy_fit(run_dir, **kw):
    from capsrun.train import Loop, fit
    from helpers import toy_run

    run = toy_run()
    run.model = _NoisyToy(run.model)
    fit(run, Loop(epochs=2, log_every=100, progress=False), run_dir, **kw)
    return run.model.state_dict()


def test_a_resume_mid_epoch_continues_the_random_draws_where_they_stopped(tmp_path):
    """Stopped after step 5 of 8 and resumed: the same weights as a run never stopped, which
    needs the global RNG as it was at the stop (the noise of steps 6-8 is drawn from it)."""
    from capsrun.train import Interrupted

    reference = _noisy_fit(tmp_path / "reference")
    calls = iter(range(1000))
    with pytest.raises(Interrupted):
        _noisy_fit(tmp_path / "run", should_stop=lambda: next(calls) == 4)
    resumed = _noisy_fit(tmp_path / "run", resume_from=tmp_path / "run" / "checkpoints" / "last.pt")
    for key, value in reference.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)


def test_the_epoch_line_of_a_model_without_labels_fills_its_test_slot():
    from capsrun.monitors import summary

    metrics = {"train/loss/total": 0.5, "test/log_likelihood/pseudo": -93.25, "best/test/log_likelihood/pseudo": -93.25}
    line = summary(metrics, {"test": None}, "test", "log_likelihood/pseudo")
    assert "test log_likelihood pseudo -93.25 (best test log_likelihood/pseudo -93.25)" in line
