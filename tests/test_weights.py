"""The one safetensors header reader (``comapoi_cli.models.weights``), on the adapter a real tiny training wrote."""

from __future__ import annotations

import json
import shutil

import pytest

from comapoi_cli.models.weights import WeightsFileError, read_safetensors_header


def test_the_header_of_a_trained_adapter_names_its_lora_tensors(trained_run):
    run = json.loads((trained_run.run_dir / "run.json").read_text())
    header = read_safetensors_header(trained_run.run_dir / "adapter_model.safetensors")
    names = [tensor.name for tensor in header.tensors]
    assert names == sorted(names) and names
    assert all(".lora_A." in name or ".lora_B." in name for name in names)
    assert {tensor.dtype for tensor in header.tensors} == {"F32"}  # trained on the CPU in float32
    assert all(len(tensor.shape) == 2 and min(tensor.shape) == run["lora"]["r"] for tensor in header.tensors)
    assert header.parameters == run["lora"]["trainable_parameters"] > 0
    assert header.metadata.get("format") == "pt"


def test_a_truncated_or_corrupt_file_is_one_sentence_and_a_corrupt_checkpoint(trained_run, tmp_path):
    from comapoi_cli.training.start import checkpoint_problem

    checkpoint = tmp_path / "checkpoint-8"
    shutil.copytree(trained_run.run_dir / "checkpoint-8", checkpoint)
    weights = checkpoint / "adapter_model.safetensors"
    assert checkpoint_problem(checkpoint) is None
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])  # a kill while copying: the header promises more bytes than there are
    with pytest.raises(WeightsFileError) as caught:
        read_safetensors_header(weights)
    message = str(caught.value)
    assert message.startswith(f"Cannot read {weights}: adapter_model.safetensors is truncated or corrupt (")
    assert message.endswith(").") and "\n" not in message and "Error while" not in message
    assert checkpoint_problem(checkpoint) == f"adapter_model.safetensors {caught.value.reason}"
    for broken in (b"", b"not a safetensors file at all", (10**9).to_bytes(8, "little") + b"{}"):
        weights.write_bytes(broken)
        with pytest.raises(WeightsFileError, match="is truncated or corrupt"):
            read_safetensors_header(weights)
    weights.unlink()
    with pytest.raises(WeightsFileError, match=r"adapter_model\.safetensors is unreadable \(no such file or directory\)\.$"):
        read_safetensors_header(weights)
