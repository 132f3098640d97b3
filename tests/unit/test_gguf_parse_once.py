"""The GGUF load's parse-once block: one reader per file inside it, gguf exactly as before after it."""

import gguf
import numpy as np
import pytest

from services.trainer.base_models import gguf_parsed_once


@pytest.fixture
def gguf_file(tmp_path):
    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_one_reader_per_file_inside_the_block(gguf_file):
    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with gguf_parsed_once():
        first = gguf.GGUFReader(gguf_file)
        assert gguf.GGUFReader(str(gguf_file)) is first  # the same file by another spelling
        assert first.fields["llama.block_count"].parts[-1][0] == 2
        assert np.array_equal(first.tensors[0].data.reshape(3, 4), np.arange(12, dtype=np.float32).reshape(3, 4))
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert gguf.GGUFReader is real_reader and gguf.get_tensor_name_map is real_map
    assert gguf.GGUFReader(gguf_file) is not first  # outside the block every call parses again


def test_gguf_is_restored_when_the_load_fails(gguf_file):
    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with pytest.raises(RuntimeError, match="load failed"), gguf_parsed_once():
        gguf.GGUFReader(gguf_file)
        raise RuntimeError("load failed")
    assert gguf.GGUFReader is real_reader and gguf.get_tensor_name_map is real_map
    with gguf_parsed_once():  # and the lock was released
        assert gguf.GGUFReader(gguf_file) is gguf.GGUFReader(gguf_file)


def test_transformers_loads_read_the_file_once_inside_the_block(gguf_file, monkeypatch):
    """The swap reaches transformers (it imports GGUFReader from gguf at call time): two loads of the
    metadata inside the block construct one reader; outside it, two."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    built = []
    real = gguf.GGUFReader

    class Counting(real):
        def __init__(self, *args, **kwargs):
            built.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    with gguf_parsed_once():
        first = load_gguf_checkpoint(str(gguf_file), return_tensors=False)["config"]
        assert load_gguf_checkpoint(str(gguf_file), return_tensors=False)["config"] == first
    assert len(built) == 1 and first["model_type"] == "llama" and first["num_hidden_layers"] == 2
    load_gguf_checkpoint(str(gguf_file), return_tensors=False)
    load_gguf_checkpoint(str(gguf_file), return_tensors=False)
    assert len(built) == 3
