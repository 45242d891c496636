"""The memory planner's search and CLI, on the CPU with a fake ``fits(batch)`` oracle."""
import argparse

import pytest
import torch

from vpeft import plan


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 31, 32, 33, 100, 1000])
@pytest.mark.parametrize("start", [1, 4, 64])
def test_search_finds_the_largest_fitting_batch(limit, start):
    calls = []

    def fits(b):
        calls.append(b)
        return b <= limit

    res = plan.largest_fitting_batch(fits, start=start, max_batch=4096)
    assert res.best == limit
    assert res.first_failure == limit + 1
    assert len(calls) == len(set(calls)), "each batch is probed once"
    assert [b for b, _ in res.probes] == calls
    assert all(ok == (b <= limit) for b, ok in res.probes)
    assert len(calls) <= 2 * 13 + 2  # doubling then bisection: logarithmic


def test_search_when_nothing_fits_and_at_the_cap():
    assert plan.largest_fitting_batch(lambda b: False).best == 0
    res = plan.largest_fitting_batch(lambda b: True, max_batch=48)
    assert res.best == 48 and res.first_failure is None
    assert [b for b, _ in res.probes] == [1, 2, 4, 8, 16, 32, 48]


def test_search_recovers_from_out_of_memory_inside_the_oracle():
    """An oracle that catches the allocator's OOM error (as ``vpeft.plan.plan`` does)."""
    def step(b):
        if b * 3 > 100:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def fits(b):
        try:
            step(b)
            return True
        except torch.OutOfMemoryError:
            return False

    assert plan.largest_fitting_batch(fits).best == 33


def test_parse_budget():
    assert plan.parse_budget("40GB") == 40e9
    assert plan.parse_budget("40") == 40e9
    assert plan.parse_budget("24GiB") == 24 * 2 ** 30
    assert plan.parse_budget("500 MB") == 500e6
    assert plan.parse_budget("1.5gb") == 1.5e9
    for bad in ("forty", "-3GB", "0GB", "40 GBs"):
        with pytest.raises(ValueError):
            plan.parse_budget(bad)


def test_plan_without_cuda_estimates(capsys, monkeypatch):
    """No CUDA device: every probe is a vpeft.memory estimate, and the answer is the boundary."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = plan.main(["--method", "linear_probe", "--backbone", "tiny-vit", "--frames", "2", "--budget", "6MB",
                    "--backend", "eager", "--no-alternatives", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    import json

    res = json.loads(out.out)
    peaks = {int(b): p for b, p in res["probe_peaks_gb"].items()}
    assert res["batch"] >= 1 and peaks[res["batch"]] * 1e9 <= 6e6 < peaks[res["first_failure"]] * 1e9
    assert res["first_failure"] == res["batch"] + 1
    assert res["peak_allocated_bytes"] <= 6e6 and set(res["breakdown"]) >= {"weights", "saved", "transients"}
    assert f"batch {res['batch']}: estimated peak" in out.err  # progress while it searches
    assert len(res["probes"]) <= 5, res["probes"]  # the guess lands near the boundary
    rc = plan.main(["--method", "linear_probe", "--backbone", "tiny-vit", "--budget", "forty"])
    assert rc == 2 and "cannot read the budget" in capsys.readouterr().err


@pytest.mark.parametrize("limit", [1, 7, 40, 41, 300])
@pytest.mark.parametrize("guessed", [1, 3, 40, 41, 1000])
def test_search_from_a_guess(limit, guessed):
    calls = []

    def fits(b):
        calls.append(b)
        return b <= limit

    res = plan.largest_fitting_batch(fits, max_batch=4096, guess=lambda probe: guessed)
    assert res.best == limit and res.first_failure == limit + 1
    assert len(calls) == len(set(calls))
    if guessed == limit:
        assert len(calls) == 2


def test_parse_options():
    assert plan.parse_options(["checkpointing=true", "side_width=320", "pos_std=0.02", "norm=post"]) == dict(
        checkpointing=True, side_width=320, pos_std=0.02, norm="post")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        plan.parse_options(["checkpointing"])


def test_estimate_cli_json(capsys):
    from vpeft import cli

    rc = cli.main(["estimate", "--method", "st_adapter_12x384", "--backbone", "tiny-vit", "--frames", "2",
                   "--batch", "2", "--no-flops", "--json"])
    import json

    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["batch"] == 2 and out["peak_allocated_bytes"] > out["saved_bytes"] > 0
    assert "flops" in out and set(out["breakdown"]) == set(out["categories"])


def test_add_plan_parser_for_the_cli():
    parser = argparse.ArgumentParser(prog="vpeft")
    plan.add_plan_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", "--method", "st_adapter_12x384", "--backbone", "ViT-B-16",
                              "--frames", "16", "--budget", "24GiB"])
    assert args.func is plan.run_plan and args.frames == 16 and args.budget == "24GiB"
    with pytest.raises(SystemExit):
        parser.parse_args(["plan", "--method", "nope", "--backbone", "ViT-B-16"])


def test_real_oracle_recovers_from_out_of_memory_on_cpu(monkeypatch):
    """The planner's own ``fits`` on a tiny model, with the allocator's OOM simulated for
    batches above 3: the search ends at 3 and every probe leaves no gradient behind."""
    from vpeft import profiling

    real_call = profiling.TrainingStep.__call__

    def call(self):
        if self.video.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        real_call(self)

    monkeypatch.setattr(profiling.TrainingStep, "__call__", call)
    vm = profiling.build_case("side4video_light", "tiny-vit", 4, "cpu", torch.float32)
    log = []
    fits = plan.batch_fits(vm, 4, 32, "cpu", torch.float32, 8, log.append)
    res = plan.largest_fitting_batch(fits, max_batch=64)
    assert res.best == 3 and res.first_failure == 4
    assert log == ["  batch 1: fits", "  batch 2: fits", "  batch 4: out of memory", "  batch 3: fits"]
    assert all(p.grad is None for p in vm.parameters())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error; this machine has CUDA")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_vpeft_plan_measure_without_cuda_says_why(capsys):
    from vpeft.cli import main

    rc = main(["plan", "--method", "st_adapter_12x384", "--backbone", "ViT-B-16", "--frames", "8", "--budget", "40GB",
               "--measure"])
    assert rc == 2
    assert "needs a CUDA device" in capsys.readouterr().err
