"""Out of memory during training ends as one sentence with what to change, and a run.json that says so.

No machine here runs out of memory on cue, so the real training path runs on the tiny model and
the error is raised where the GPU (or the CPU allocator) raises it: inside a training step.
"""

from __future__ import annotations

import json

import pytest

from comapoi_cli.training.errors import OutOfMemoryError
from comapoi_cli.training.job import TrainingJob
from comapoi_cli.training.report import Reporter
from comapoi_cli.training.trl_trainer import TRLTrainingPath


class OutOfMemoryAtStep3(TRLTrainingPath):
    """The TRL path, with a training step that fails as CUDA (or the host) does when memory runs out."""

    error: BaseException

    def make_trainer(self, *args, **kwargs):
        trainer = super().make_trainer(*args, **kwargs)
        original = trainer.training_step

        def training_step(*a, **k):
            if trainer.state.global_step == 2:
                raise self.error
            return original(*a, **k)

        trainer.training_step = training_step
        return trainer


def oom_cuda():
    import torch

    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 18.56 GiB. GPU 0 has a total capacity of 79.19 GiB")


def oom_host():
    return RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                        "you tried to allocate 19931332608 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.slow
@pytest.mark.parametrize("make_error", [oom_cuda, oom_host])
def test_out_of_memory_is_one_sentence_with_the_options(make_error, agent_data_dir, tmp_path):
    job = TrainingJob(type="agent3", dataset="nyc", data_dir=str(agent_data_dir), model="tiny", base_model="tiny",
                      seq_length=1536, batch_size=2, test_size=4, max_steps=6, save_freq=6, output_dir=str(tmp_path))
    path = OutOfMemoryAtStep3(job, Reporter())
    path.error = make_error()
    with pytest.raises(OutOfMemoryError) as caught:
        path.run()
    error = caught.value
    assert error.message.startswith("The host ran out of memory at step 3 of 6 (micro-batch 2 x up to 1536 tokens")
    assert "\n" not in error.message
    for option in ("smaller --batch_size", "--gradient_accumulation_steps to keep the effective batch 2",
                   "shorter --seq_length than 1536", "--gradient_checkpointing"):
        assert option in error.hint
    run = json.loads((job.run_dir / "run.json").read_text())
    assert run["status"] == "failed" and run["error"] == error.message


def test_other_errors_are_not_taken_for_out_of_memory():
    from comapoi_cli.training.trl_trainer import _is_out_of_memory

    assert not _is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert _is_out_of_memory(MemoryError()) and _is_out_of_memory(oom_host()) and _is_out_of_memory(oom_cuda())
