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


def test_plan_without_cuda_gives_a_clear_error(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = plan.main(["--method", "side4video_light", "--backbone", "EVA02-E-14", "--frames", "8",
                    "--budget", "40GB"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "needs a CUDA device" in err and "torch.cuda.is_available() is False" in err


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
def test_vpeft_plan_subcommand_without_cuda_says_why(capsys):
    from vpeft.cli import main

    rc = main(["plan", "--method", "st_adapter_12x384", "--backbone", "ViT-B-16", "--frames", "8", "--budget", "40GB"])
    assert rc == 2
    assert "needs a CUDA device" in capsys.readouterr().err
